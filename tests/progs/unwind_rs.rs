//! Leaks known amounts from Rust built as a release build is: optimised, no frame pointers (nor
//! has the prebuilt std). Only the DWARF call-frame information (.eh_frame) leads from malloc
//! back through the global allocator to main: main -> std's lang_start -> unwind_rs::main ->
//! run_leaks -> leak_* -> __rust_alloc -> malloc.
//!
//! The tests read the expected file:line of each leak from the LEAK: markers below.
use std::hint::black_box;

/// 3 x 2048 bytes.
#[inline(never)]
fn leak_box() {
    for _ in 0..3 {
        black_box(Box::leak(black_box(Box::new([1u8; 2048])))); // LEAK:leak_box
    }
}

/// 1500 u16s: one block of exactly 3000 bytes (`vec!` with a non-zero value: malloc, not calloc).
#[inline(never)]
fn leak_vec() {
    black_box(vec![black_box(7u16); 1500].leak()); // LEAK:leak_vec
}

/// 2 x 1000 bytes: `repeat` allocates the exact length, once.
#[inline(never)]
fn leak_string() {
    for _ in 0..2 {
        black_box(black_box("leak").repeat(250).leak()); // LEAK:leak_string
    }
}

/// Allocated and dropped: must not appear in any report.
#[inline(never)]
fn churn() {
    for _ in 0..100 {
        drop(black_box(Box::new([2u8; 2048])));
        drop(black_box(vec![black_box(7u16); 1500]));
        drop(black_box(black_box("churn").repeat(200)));
    }
}

#[inline(never)]
fn run_leaks() {
    leak_box();
    black_box(());
    leak_vec();
    black_box(());
    leak_string();
    black_box(());
    churn();
    black_box(());
}

// Kept out of lang_start's code, so it is a frame of its own.
#[inline(never)]
fn main() {
    run_leaks();
    black_box(());
}
