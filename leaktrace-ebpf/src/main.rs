//! leaktrace's eBPF programs: one module per probe family.
#![no_std]
#![no_main]

mod block;
mod carrier;
mod maps;
mod native;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
