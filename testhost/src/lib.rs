//! crx-testhost (placeholder).
