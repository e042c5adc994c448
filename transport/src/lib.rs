//! Request/response messages over QUIC with mutual TLS. (Being built; see issue 6.)
