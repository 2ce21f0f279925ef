//! Who may run at the same time. libtest runs the tests of this one binary in parallel
//! threads, while cargo used to run each area's binary after the other: heavy tests (tens of
//! thousands of connections or associations, fd, RSS or CPU figures, shutdown and drain
//! timing) must neither overlap each other nor slow the latency-sensitive light ones (timeouts,
//! keepalives, handshakes).
//!
//! Every test takes one guard as its first statement and holds it to the end:
//! `let _guard = shared();` for a light test (it runs alongside other light tests only), or
//! `let _guard = exclusive();` for a heavy one (it runs alone). `Relay::start` checks that
//! the calling thread holds one, so a test that forgets fails loudly.

use std::cell::Cell;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

static LOCK: RwLock<()> = RwLock::new(());

thread_local! {
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// Held for a whole test; see the module docs.
pub struct TestGuard {
    _shared: Option<RwLockReadGuard<'static, ()>>,
    _exclusive: Option<RwLockWriteGuard<'static, ()>>,
}

impl Drop for TestGuard {
    fn drop(&mut self) {
        HELD.with(|h| h.set(false));
    }
}

fn mark_held() {
    HELD.with(|h| {
        assert!(!h.get(), "this test thread already holds a test guard");
        h.set(true);
    });
}

/// For a light test: runs alongside other light tests, never alongside a heavy one.
pub fn shared() -> TestGuard {
    // A test that failed while holding the lock poisons it; the lock guards no data.
    let g = LOCK.read().unwrap_or_else(PoisonError::into_inner);
    mark_held();
    TestGuard {
        _shared: Some(g),
        _exclusive: None,
    }
}

/// For a heavy test: runs alone.
pub fn exclusive() -> TestGuard {
    let g = LOCK.write().unwrap_or_else(PoisonError::into_inner);
    mark_held();
    TestGuard {
        _shared: None,
        _exclusive: Some(g),
    }
}

/// Panics unless the calling thread holds a [`TestGuard`].
pub fn assert_guarded() {
    assert!(
        HELD.with(Cell::get),
        "a test must take `shared()` or `exclusive()` (tests/e2e/common/guard.rs) first"
    );
}
