#![no_std]
// This file exists to enable the library target, which the userspace crate depends on so that
// cargo rebuilds it when the eBPF sources change.
