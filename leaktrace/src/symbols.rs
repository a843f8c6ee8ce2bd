//! Symbols of the target binary, read from its own ELF (`.dynsym`, then `.symtab`) so that a
//! missing symbol is reported by name before aya tries to attach (aya's own error for that case
//! talks about debuglink files).

use std::{collections::HashMap, fs, path::Path};

use object::{Object, ObjectSegment, ObjectSymbol};

use crate::error::Error;

/// Symbol table of one ELF binary: name -> (virtual address, size).
#[derive(Debug, Default)]
pub struct SymbolTable {
    binary: String,
    symbols: HashMap<String, (u64, u64)>,
    /// Virtual address of the first loadable segment (what the load bias is measured against).
    first_load_vaddr: u64,
}

impl SymbolTable {
    /// Reads the symbols of `path`; `display` names the binary in errors.
    pub fn read(path: &Path, display: &str) -> Result<SymbolTable, Error> {
        let bad = |reason: String| Error::BadBinary {
            binary: display.to_owned(),
            reason,
        };
        let data = fs::read(path).map_err(|e| bad(e.to_string()))?;
        let file = object::File::parse(&*data).map_err(|e| bad(e.to_string()))?;
        let mut symbols = HashMap::new();
        for sym in file.dynamic_symbols().chain(file.symbols()) {
            if sym.is_undefined() || sym.address() == 0 {
                continue;
            }
            if let Ok(name) = sym.name() {
                symbols
                    .entry(name.to_owned())
                    .or_insert((sym.address(), sym.size()));
            }
        }
        let first_load_vaddr = file.segments().map(|s| s.address()).min().unwrap_or(0);
        Ok(SymbolTable {
            binary: display.to_owned(),
            symbols,
            first_load_vaddr,
        })
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
        fs::write(&path, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(
            SymbolTable::read(&path, "x"),
            Err(Error::BadBinary { .. })
        ));
    }
}
