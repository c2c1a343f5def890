//! crx-core (placeholder).
