//! Placeholder: filled by the errors work (issue 11, acceptance 5).
fn main() {}
