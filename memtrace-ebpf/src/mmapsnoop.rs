//! mmapsnoop: (stub, to be written)
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

memtrace_ebpf::license!();
