//! Leaks known amounts through Rust's global allocator (the system allocator, so libc's
//! malloc underneath) from named functions. Built by the tests with frame pointers.
use std::hint::black_box;

/// 4096 bytes, one allocation.
#[inline(never)]
fn leak_boxed_array() {
    let block: Box<[u8; 4096]> = black_box(Box::new([7u8; 4096])); // LEAK:leak_boxed_array
    Box::leak(block);
}

/// 2 x 1500 bytes.
#[inline(never)]
fn leak_vec_capacity() {
    for _ in 0..2 {
        let v: Vec<u8> = black_box(Vec::with_capacity(1500)); // LEAK:leak_vec_capacity
        std::mem::forget(v);
    }
}

/// Allocated and dropped: must not be reported.
#[inline(never)]
fn no_leak() {
    for _ in 0..10 {
        let v: Vec<u64> = black_box(vec![1; 999]);
        drop(v);
    }
}

fn main() {
    leak_boxed_array();
    leak_vec_capacity();
    no_leak();
}
