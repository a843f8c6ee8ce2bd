//! Symbols of the target binary, read from its own ELF (`.dynsym`, then `.symtab`) so that a
//! missing symbol is reported by name before aya tries to attach (aya's own error for that case
//! talks about debuglink files), and so that probes attach at file offsets computed here: aya,
//! given a symbol name, would map the file by its path itself.
//!
//! The file is one the target may control (a library it maps): it is opened by
//! [`crate::target::open`] (a regular file, at most [`ELF_CAP`] bytes, never a FIFO or
//! device), and only the parts the ELF parser asks for are read, through a cache, rather than
//! the whole file or a mapping of it (a mapping of a file its owner truncates would kill the
//! tracer with SIGBUS).

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt, path::Path};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache};

use crate::{
    error::Error,
    target::open::{AnyOwner, ELF_CAP, open_resolved},
};

/// Symbol table of one ELF binary: name -> (virtual address, size).
#[derive(Debug, Default)]
pub struct SymbolTable {
    binary: String,
    symbols: HashMap<String, (u64, u64)>,
    /// Virtual address of the first loadable segment (what the load bias is measured against).
    first_load_vaddr: u64,
    /// Sections with bytes in the file: (virtual address, size, file offset).
    sections: Vec<(u64, u64, u64)>,
    /// Loadable segments: (virtual address, file offset, size in the file).
    segments: Vec<(u64, u64, u64)>,
    /// Defined symbols by address: (address, size, name), sorted.
    by_address: Vec<(u64, u64, String)>,
    /// The file read, kept open for [`SymbolTable::bytes_at`].
    file: Option<File>,
}

impl SymbolTable {
    /// Reads the symbols of `path`, a path the kernel resolves to one file (`/proc/PID/exe`,
    /// `/proc/PID/map_files/...`, `/proc/self/fd/N`, or the operator's); `display` names the
    /// binary in errors.
    pub fn read(path: &Path, display: &str) -> Result<SymbolTable, Error> {
        let file =
            open_resolved(path, AnyOwner { cap: ELF_CAP }).map_err(|reason| Error::BadBinary {
                binary: display.to_owned(),
                reason: format!("{} {reason}", path.display()),
            })?;
        SymbolTable::from_file(file, display)
    }

    /// Reads the symbols of an opened, checked ELF file; `display` names it in errors.
    pub fn from_file(file: File, display: &str) -> Result<SymbolTable, Error> {
        let bad = |reason: String| Error::BadBinary {
            binary: display.to_owned(),
            reason,
        };
        let cache = ReadCache::new(&file);
        let elf = object::File::parse(&cache).map_err(|e| bad(e.to_string()))?;
        let mut symbols = HashMap::new();
        for sym in elf.dynamic_symbols().chain(elf.symbols()) {
            if sym.is_undefined() || sym.address() == 0 {
                continue;
            }
            if let Ok(name) = sym.name() {
                symbols
                    .entry(name.to_owned())
                    .or_insert((sym.address(), sym.size()));
            }
        }
        let mut by_address: Vec<(u64, u64, String)> = symbols
            .iter()
            .map(|(name, (addr, size))| (*addr, *size, name.clone()))
            .collect();
        by_address.sort_unstable();
        let segments = elf
            .segments()
            .map(|s| {
                let (off, len) = s.file_range();
                (s.address(), off, len)
            })
            .collect();
        let first_load_vaddr = elf.segments().map(|s| s.address()).min().unwrap_or(0);
        let sections = elf
            .sections()
            .filter(|s| s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.file_range()?.0)))
            .collect();
        drop(elf);
        drop(cache);
        Ok(SymbolTable {
            binary: display.to_owned(),
            symbols,
            first_load_vaddr,
            sections,
            segments,
            by_address,
            file: Some(file),
        })
    }

    /// File offset of the virtual address `vaddr` (what a uprobe is attached at).
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.sections
            .iter()
            .find(|(addr, size, _)| *addr <= vaddr && vaddr < addr.saturating_add(*size))
            .map(|(addr, _, off)| vaddr - addr + off)
    }

    /// The function holding the byte at `file_offset` of the file (a return address found in
    /// a mapping, as `mapping offset + address - mapping start`), with no size past its end.
    pub fn name_at_file_offset(&self, file_offset: u64) -> Option<&str> {
        let (vaddr, off, _) = self
            .segments
            .iter()
            .find(|(_, off, len)| *off <= file_offset && file_offset < off.saturating_add(*len))?;
        let vaddr = vaddr + (file_offset - off);
        let i = self
            .by_address
            .partition_point(|(a, _, _)| *a <= vaddr)
            .checked_sub(1)?;
        let (addr, size, name) = &self.by_address[i];
        (*size == 0 || vaddr < addr.saturating_add(*size)).then_some(name.as_str())
    }

    /// File offset of the symbol `name`.
    pub fn file_offset_of(&self, name: &str) -> Option<u64> {
        self.file_offset(self.get(name)?.0)
    }

    /// Up to `len` bytes of the file at virtual address `vaddr` (fewer at its section's end).
    pub fn bytes_at(&self, vaddr: u64, len: usize) -> Result<Vec<u8>, String> {
        let (addr, size, off) = self
            .sections
            .iter()
            .find(|(addr, size, _)| *addr <= vaddr && vaddr < addr.saturating_add(*size))
            .ok_or_else(|| format!("no section of {} holds {vaddr:#x}", self.binary))?;
        let len = len.min((addr + size - vaddr) as usize);
        let file = self.file.as_ref().ok_or("no file")?;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, vaddr - addr + off)
            .map_err(|e| format!("{}: {e}", self.binary))?;
        Ok(buf)
    }

    /// Whether the binary defines `name`.
    pub fn has(&self, name: &str) -> bool {
        self.symbols.contains_key(name)
    }

    /// Virtual address and size of `name`.
    pub fn get(&self, name: &str) -> Option<(u64, u64)> {
        self.symbols.get(name).copied()
    }

    /// Fails with an error naming the first of `names` the binary does not define.
    pub fn require(&self, names: &[&str]) -> Result<(), Error> {
        match names.iter().find(|n| !self.has(n)) {
            Some(missing) => Err(Error::MissingSymbol {
                binary: self.binary.clone(),
                symbol: (*missing).to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// Virtual address of the first loadable segment.
    pub fn first_load_vaddr(&self) -> u64 {
        self.first_load_vaddr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn leaktrace_symbols_probe_target(x: u64) -> u64 {
        x.wrapping_mul(3)
    }

    #[test]
    fn finds_own_symbol_and_names_missing_one() {
        assert_eq!(leaktrace_symbols_probe_target(2), 6);
        let table = SymbolTable::read(Path::new("/proc/self/exe"), "test binary").unwrap();
        assert!(table.has("leaktrace_symbols_probe_target"));
        let err = table
            .require(&["leaktrace_symbols_probe_target", "erts_no_such_symbol"])
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("erts_no_such_symbol"), "{msg}");
        assert!(msg.contains("test binary"), "{msg}");
    }

    #[test]
    fn garbage_is_a_bad_binary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-elf");
        std::fs::write(&path, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(
            SymbolTable::read(&path, "x"),
            Err(Error::BadBinary { .. })
        ));
    }

    #[test]
    fn file_offsets_and_bytes_match_the_code() {
        let table = SymbolTable::read(Path::new("/proc/self/exe"), "test binary").unwrap();
        let (vaddr, _) = table.get("leaktrace_symbols_probe_target").unwrap();
        let off = table
            .file_offset_of("leaktrace_symbols_probe_target")
            .unwrap();
        let whole = std::fs::read("/proc/self/exe").unwrap();
        let bytes = table.bytes_at(vaddr, 16).unwrap();
        assert_eq!(bytes, whole[off as usize..off as usize + 16]);
    }

    #[test]
    fn a_return_address_is_named_from_its_file_offset() {
        let table = SymbolTable::read(Path::new("/proc/self/exe"), "test binary").unwrap();
        let off = table
            .file_offset_of("leaktrace_symbols_probe_target")
            .unwrap();
        assert_eq!(
            table.name_at_file_offset(off + 1),
            Some("leaktrace_symbols_probe_target")
        );
        assert_eq!(table.name_at_file_offset(u64::MAX), None);
    }

    #[test]
    fn a_fifo_or_a_huge_file_is_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = SymbolTable::read(&fifo, "fifo").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(ELF_CAP + 1).unwrap();
        let e = SymbolTable::read(&big, "big").unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }
}
