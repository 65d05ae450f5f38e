//! A cache hint for the hot paths that touch memory in an order they know ahead: the shard's
//! pending table (a plan's held requests) and the load generator's receivers (the requests a
//! read's replies answer, scattered over millions of slots).

/// Asks the CPU to bring `value`'s cache line in; does nothing on targets without the hint.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads and writes no memory (and may not even touch the line); the
    // address is of a live reference. SSE is in every x86-64's baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((value as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
