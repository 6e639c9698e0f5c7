//! Test helpers shared by proxyless's test crates (see docs/ARCHITECTURE.md).
