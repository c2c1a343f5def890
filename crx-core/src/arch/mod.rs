//! Architecture-specific boot setup. CRX runs x86_64 guests only.

pub mod x86_64;
