//! The running image of beam.smp in the target's memory: its load bias, and exported tables
//! read through `/proc/PID/mem` (allocator names, the literal mapper's address).

use std::{fs::File, io, os::unix::fs::FileExt, path::Path};

use crate::symbols::SymbolTable;

/// Where beam.smp is mapped in the target, and the symbols to read its tables with.
#[derive(Debug)]
pub struct ImageView<'a> {
    pid: u32,
    bias: u64,
    symbols: &'a SymbolTable,
}

impl<'a> ImageView<'a> {
    /// Finds the load bias of `exe` in PID's mappings (the PIE is mapped at a random base).
    pub fn find(pid: u32, exe: &Path, symbols: &'a SymbolTable) -> Option<ImageView<'a>> {
        let maps = crate::target::maps_text(pid).ok()?;
        let exe = exe.to_str()?;
        let start = maps.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let _perms = fields.next()?;
            let offset = fields.next()?;
            let _dev = fields.next()?;
            let _inode = fields.next()?;
            let path: Vec<&str> = fields.collect();
            let path = path.join(" ");
            let path = path.strip_suffix(" (deleted)").unwrap_or(&path);
            (path == exe && u64::from_str_radix(offset, 16).ok()? == 0)
                .then(|| u64::from_str_radix(range.split('-').next()?, 16).ok())
                .flatten()
        })?;
        Some(ImageView {
            pid,
            bias: start.wrapping_sub(symbols.first_load_vaddr() & !0xfff),
            symbols,
        })
    }

    /// Runtime address of an exported symbol.
    pub fn address_of(&self, symbol: &str) -> Option<u64> {
        self.symbols
            .get(symbol)
            .map(|(vaddr, _)| self.bias.wrapping_add(vaddr))
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let mem = File::open(format!("/proc/{}/mem", self.pid))?;
        mem.read_exact_at(buf, addr)
    }

    fn read_c_string(&self, addr: u64) -> Option<String> {
        let mut buf = [0u8; 64];
        self.read(addr, &mut buf).ok()?;
        let end = buf.iter().position(|b| *b == 0)?;
        std::str::from_utf8(&buf[..end]).ok().map(str::to_owned)
    }

    /// Allocator names by number, from the exported `const char *erts_alc_a2ad[]`
    /// (filled by erts_alloc_init, so only meaningful once the VM has started).
    pub fn allocator_names(&self) -> Option<Vec<Option<String>>> {
        let (_, size) = self.symbols.get("erts_alc_a2ad")?;
        let table = self.address_of("erts_alc_a2ad")?;
        let count = (size / 8).min(64) as usize;
        let mut raw = vec![0u8; count * 8];
        self.read(table, &mut raw).ok()?;
        let names: Vec<Option<String>> = raw
            .chunks_exact(8)
            .map(|p| u64::from_le_bytes(p.try_into().expect("8-byte chunk")))
            .map(|ptr| (ptr != 0).then(|| self.read_c_string(ptr)).flatten())
            .collect();
        names.iter().any(Option::is_some).then_some(names)
    }

    /// The pointers of an exported pointer array (`max` at most), read through /proc/PID/mem.
    pub fn pointer_table(&self, symbol: &str, max: usize) -> Option<Vec<u64>> {
        let (_, size) = self.symbols.get(symbol)?;
        let table = self.address_of(symbol)?;
        let count = ((size / 8) as usize).min(max);
        let mut raw = vec![0u8; count * 8];
        self.read(table, &mut raw).ok()?;
        Some(
            raw.chunks_exact(8)
                .map(|p| u64::from_le_bytes(p.try_into().expect("8-byte chunk")))
                .collect(),
        )
    }

    /// The strings of an exported `const char *[]` (`max` at most; None for a null or
    /// unreadable entry), read through /proc/PID/mem.
    pub fn string_table(&self, symbol: &str, max: usize) -> Option<Vec<Option<String>>> {
        let names: Vec<Option<String>> = self
            .pointer_table(symbol, max)?
            .into_iter()
            .map(|ptr| (ptr != 0).then(|| self.read_c_string(ptr)).flatten())
            .collect();
        names.iter().any(Option::is_some).then_some(names)
    }
}
