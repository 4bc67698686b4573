//! rustls's unbuffered API over `TlsStream`'s own buffers: what it decrypts goes to the
//! reader or `plaintext`, what it encrypts to `outgoing`; after a TLS error, its alert.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;
use tokio_rustls::rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, UnbufferedStatus,
};

use super::{tls_error, TlsStream};

impl<S> TlsStream<S> {
    /// Runs rustls over `buf` (received bytes: `incoming`, then what was just read) until it
    /// needs more input. Decrypted data goes to `out` (while nothing is waiting before it),
    /// the rest to `plaintext`; records to send go to `outgoing`. Returns how many bytes of
    /// `buf` are consumed.
    pub(super) fn process(
        &mut self,
        buf: &mut [u8],
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<usize> {
        let mut used = 0;
        // Every round consumes input or moves the state on; the bound is a safety net.
        for _ in 0..buf.len() + 1024 {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut buf[used..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    self.fail(Some(&mut buf[used + discard..]));
                    return Err(tls_error(e));
                }
            };
            let mut done = false;
            match state {
                ConnectionState::ReadTraffic(mut t) => {
                    while let Some(record) = t.next_record() {
                        let AppDataRecord {
                            discard: d,
                            mut payload,
                        } = record.map_err(tls_error)?;
                        discard += d;
                        if let Some(out) = out.as_deref_mut() {
                            if self.plain_at == self.plaintext.len() {
                                let n = out.remaining().min(payload.len());
                                out.put_slice(&payload[..n]);
                                payload = &payload[n..];
                            }
                        }
                        self.plaintext.extend_from_slice(payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let at = self.outgoing.len();
                    let n = match e.encode(&mut []) {
                        Err(EncodeError::InsufficientSize(s)) => {
                            self.outgoing.resize(at + s.required_size, 0);
                            e.encode(&mut self.outgoing[at..]).map_err(tls_error)?
                        }
                        Ok(n) => n,
                        Err(e) => return Err(tls_error(e)),
                    };
                    self.outgoing.truncate(at + n);
                }
                // Sent by the caller after this returns (before it waits for input).
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => {
                    done = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.read_closed = true;
                    done = true;
                }
                // Early data is off (`max_early_data_size` 0).
                _ => return Err(tls_error("unexpected connection state")),
            }
            used += discard;
            if done {
                return Ok(used);
            }
        }
        Err(tls_error("no progress"))
    }

    /// After an error: no more reads or writes. After a TLS error, `rest` is the input rustls
    /// has not consumed (it must see the same bytes again), and the alert it queued goes to
    /// `outgoing` for a last-gasp write.
    pub(super) fn fail(&mut self, rest: Option<&mut [u8]>) {
        self.broken = true;
        self.incoming = Vec::new();
        self.plaintext = Vec::new();
        self.plain_at = 0;
        let Some(rest) = rest else { return };
        // Only while rustls has records queued: then `process_tls_records` hands them out
        // before it looks at the input again (looking again could meet the same error).
        for _ in 0..8 {
            let common: &rustls::CommonState = &self.conn;
            if !common.wants_write() {
                break;
            }
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut *rest);
            let Ok(ConnectionState::EncodeTlsData(mut e)) = state else {
                break;
            };
            let at = self.outgoing.len();
            if let Err(EncodeError::InsufficientSize(s)) = e.encode(&mut []) {
                self.outgoing.resize(at + s.required_size, 0);
                match e.encode(&mut self.outgoing[at..]) {
                    Ok(n) => self.outgoing.truncate(at + n),
                    Err(_) => self.outgoing.truncate(at),
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Puts the rustls connection in the state where it encrypts application data, handling
    /// whatever comes first, and runs `f` with it, encrypting into `outgoing`.
    pub(super) fn encrypt_with(
        &mut self,
        mut f: impl FnMut(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
        estimate: usize,
    ) -> io::Result<()> {
        for _ in 0..64 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming[..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    let mut rest = std::mem::take(&mut self.incoming);
                    rest.drain(..discard);
                    self.fail(Some(&mut rest));
                    return Err(tls_error(e));
                }
            };
            let mut wrote = false;
            match state {
                ConnectionState::WriteTraffic(mut w) => {
                    let at = self.outgoing.len();
                    self.outgoing.resize(at + estimate, 0);
                    let n = match f(&mut w, &mut self.outgoing[at..]) {
                        Err(EncryptError::InsufficientSize(s)) => {
                            self.outgoing.resize(at + s.required_size, 0);
                            f(&mut w, &mut self.outgoing[at..])
                        }
                        r => r,
                    };
                    match n {
                        Ok(n) => self.outgoing.truncate(at + n),
                        Err(e) => {
                            self.outgoing.truncate(at);
                            return Err(tls_error(e));
                        }
                    }
                    wrote = true;
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let at = self.outgoing.len();
                    if let Err(EncodeError::InsufficientSize(s)) = e.encode(&mut []) {
                        self.outgoing.resize(at + s.required_size, 0);
                        let n = e.encode(&mut self.outgoing[at..]).map_err(tls_error)?;
                        self.outgoing.truncate(at + n);
                    }
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::ReadTraffic(mut t) => {
                    // Not expected (reads drain every record), but keep the data if so.
                    while let Some(record) = t.next_record() {
                        let record = record.map_err(tls_error)?;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                }
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed => {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "tls: closed"));
                }
                _ => return Err(tls_error("not ready to send")),
            }
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if wrote {
                return Ok(());
            }
        }
        Err(tls_error("no progress"))
    }
}
