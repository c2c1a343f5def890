//! crx-benches (placeholder).
