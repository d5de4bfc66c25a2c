//! Types and rules shared by guard's kernel programs (`guard-ebpf`) and its
//! userspace (`guard-daemon`).
//!
//! Everything here is `no_std` so the kernel side can use it; the `user`
//! feature adds what only userspace needs: each shared module keeps its
//! userspace half in a `user.rs` beside it (aya `Pod` impls), and
//! [`pattern`] (parsing names as users write them) is userspace only.
//! Layouts are `#[repr(C)]` and checked by size assertions, because the two
//! sides are compiled by different compilers for different targets.
#![no_std]

#[cfg(any(feature = "user", test))]
extern crate std;

pub mod event;
pub mod evidence;
pub mod maps;
pub mod matching;

#[cfg(feature = "user")]
pub mod pattern;
