//! brkstack: events shared by the kernel and user halves (stub, to be written).
