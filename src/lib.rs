//! Examples and end-to-end tests for `mmap-session`; this library is empty.
