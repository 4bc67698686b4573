//! Client transports (being written).
