use which::which;

/// The eBPF crate links with `bpf-linker`; rebuild when it changes. If it is missing, say how to get it.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => {
            println!(
                "cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup` to install it"
            );
        }
    }
}
