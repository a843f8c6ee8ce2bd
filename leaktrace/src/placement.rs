//! Where to put a probe in a function: on an instruction the kernel emulates.
//!
//! A uprobe hit on `push` or `nop` is emulated (~0.9 µs here); on `mov`, `test` or `cmp` the
//! instruction is single-stepped out of line (4-11 µs in this VM). glibc's `free` starts with
//! `test %rdi,%rdi; je` and pushes at +9: a probe there sees every non-NULL free with `rdi`
//! still the pointer, at a fifth of the cost. The first bytes of each function are decoded at
//! attach, so a libc built otherwise gets a probe at +0 rather than a wrong one.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, Register};

use crate::symbols::SymbolTable;

/// How far into a function a probe may move.
const WINDOW: usize = 32;

/// A chosen probe point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Offset from the symbol's start.
    pub offset: u64,
    /// The instruction under the probe, as decoded (for the report).
    pub instruction: String,
    /// Whether the kernel emulates it (cheap) or single-steps it (dear).
    pub emulated: bool,
}

/// What a probe at a later offset may skip over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Nothing: the probe stays at +0 unless +0 is emulated already.
    Nothing,
    /// Flag-only tests and one conditional branch (a NULL test whose taken path does nothing
    /// the probe needs to see, as in `free(NULL)`).
    NullTest,
    /// A `lock`-prefixed first instruction, which the kernel refuses to probe (`lock incq` of
    /// `enif_keep_resource`): the probe goes on the next one, arguments intact.
    Locked,
}

/// Registers that carry arguments and the stack pointer: an instruction writing one of them
/// changes what the probe reads.
const KEPT: [Register; 7] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
    Register::RSP,
];

fn emulated(i: &Instruction) -> bool {
    matches!(i.mnemonic(), Mnemonic::Nop)
        || matches!(
            i.code(),
            Code::Push_r64 | Code::Push_rm64 if i.op0_register().is_gpr64()
        )
}

fn writes_kept(i: &Instruction) -> bool {
    let mut info = iced_x86::InstructionInfoFactory::new();
    info.info(i).used_registers().iter().any(|r| {
        matches!(
            r.access(),
            iced_x86::OpAccess::Write
                | iced_x86::OpAccess::CondWrite
                | iced_x86::OpAccess::ReadWrite
                | iced_x86::OpAccess::ReadCondWrite
        ) && KEPT.contains(&r.register().full_register())
    })
}

/// Chooses the probe offset in `code` (the function's first bytes, at address `ip`).
pub fn choose(code: &[u8], ip: u64, skip: Skip) -> Placement {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut first: Option<Placement> = None;
    let mut branches = 0;
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.is_invalid() {
            break;
        }
        let here = Placement {
            offset: i.ip() - ip,
            instruction: format!("{i}"),
            emulated: emulated(&i),
        };
        let at_start = first.is_none();
        if at_start {
            first = Some(here.clone());
        }
        if here.emulated {
            return here;
        }
        if skip == Skip::Locked {
            if i.has_lock_prefix() && !writes_kept(&i) {
                continue;
            }
            return here;
        }
        if skip == Skip::Nothing || writes_kept(&i) {
            break;
        }
        let ok = match i.flow_control() {
            FlowControl::Next => matches!(i.mnemonic(), Mnemonic::Test | Mnemonic::Cmp),
            FlowControl::ConditionalBranch => {
                branches += 1;
                branches == 1
            }
            _ => false,
        };
        if !ok {
            break;
        }
    }
    first.unwrap_or(Placement {
        offset: 0,
        instruction: "(not decoded)".into(),
        emulated: false,
    })
}

/// Reads the first bytes of the function at virtual address `vaddr` of the ELF whose
/// `symbols` were read (only those bytes: the file is one the target may control) and
/// chooses its probe offset.
pub fn for_symbol(symbols: &SymbolTable, vaddr: u64, skip: Skip) -> Result<Placement, String> {
    let code = symbols.bytes_at(vaddr, WINDOW)?;
    Ok(choose(&code, vaddr, skip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_moves_past_its_null_test() {
        // glibc 2.36 free: test %rdi,%rdi; je +0x..; push %rbp; ...
        let free = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0x91, 0x00, 0x00, 0x00, 0x55, 0x48, 0x89,
        ];
        let p = choose(&free, 0x1000, Skip::NullTest);
        assert_eq!(p.offset, 9, "{p:?}");
        assert!(p.emulated && p.instruction.starts_with("push"), "{p:?}");
        // Without permission to skip, the probe stays at +0, honestly dear.
        let p = choose(&free, 0x1000, Skip::Nothing);
        assert_eq!((p.offset, p.emulated), (0, false), "{p:?}");
    }

    #[test]
    fn a_locked_first_instruction_is_stepped_over() {
        // enif_keep_resource: lock incq -0x38(%rdi); ret
        let keep = [0xf0, 0x48, 0xff, 0x47, 0xc8, 0xc3];
        let p = choose(&keep, 0, Skip::Locked);
        assert_eq!(p.offset, 5, "{p:?}");
        assert!(p.instruction.starts_with("ret"), "{p:?}");
    }

    #[test]
    fn push_at_the_start_stays() {
        let malloc = [0x55, 0x53, 0x48, 0x83, 0xec, 0x18];
        let p = choose(&malloc, 0, Skip::NullTest);
        assert_eq!((p.offset, p.emulated), (0, true));
    }

    #[test]
    fn never_moves_past_a_write_to_an_argument() {
        // mov %rdi,%rbx; push %rbx: rdi is only read, but "mov %rsi,%rdi" writes rdi.
        let code = [0x48, 0x89, 0xf7, 0x53];
        let p = choose(&code, 0, Skip::NullTest);
        assert_eq!((p.offset, p.emulated), (0, false), "{p:?}");
        // Two branches: the second could skip the probe on a path that matters.
        let two = [0x48, 0x85, 0xff, 0x74, 0x02, 0x74, 0x00, 0x55];
        let p = choose(&two, 0, Skip::NullTest);
        assert_eq!(p.offset, 0, "{p:?}");
    }
}
