//! symphony-verify: checks over whole runs.
//!
//! The tests live in `tests/`; this library holds the auditor they share: it checks a
//! simulation's plans and request outcomes against the rules every policy must keep.
