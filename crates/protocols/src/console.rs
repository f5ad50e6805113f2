//! The debug console's wire format (`kata-runtime exec` ↔ the agent).
//!
//! A connection starts raw, as Kata's console does: bytes in, bytes out, a shell on a pty.
//! A client that sends [`HELLO`] (a line: `KATA-RS-CONSOLE/1 ROWS COLS TERM\n`) within
//! [`HELLO_WAIT_MS`] switches the connection to frames both ways, which carry what a raw byte
//! stream cannot: the terminal's size (and its changes) and the shell's exit status. A frame is
//! a type byte, a big-endian `u32` length and that many bytes of payload.

use std::io::{self, Read, Write};

/// Virtio-serial port name of the debug console (hosts without vsock).
pub const DEBUG_CONSOLE_PORT_NAME: &str = "agent.debug_console.0";
/// vsock port of the debug console (Kata's `agent.debug_console_vport`).
pub const DEBUG_CONSOLE_VPORT: u32 = 1026;
/// First word of the hello line.
pub const HELLO: &str = "KATA-RS-CONSOLE/1";
/// How long the agent waits for a hello before serving the connection raw.
pub const HELLO_WAIT_MS: u64 = 300;
/// The largest frame payload accepted.
pub const MAX_FRAME: usize = 1 << 16;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Terminal bytes.
    Data(Vec<u8>),
    /// The client's terminal size changed.
    WindowSize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// The shell ended with this status (128 + signal when killed); the last frame.
    Exit(i32),
    /// The console is serving this connection with this shell; the first frame.
    Ready(String),
}

const DATA: u8 = 0;
const WINSIZE: u8 = 1;
const EXIT: u8 = 2;
const READY: u8 = 3;

impl Frame {
    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Frame::Data(d) => (DATA, d.clone()),
            Frame::WindowSize { rows, cols } => {
                let mut p = rows.to_be_bytes().to_vec();
                p.extend_from_slice(&cols.to_be_bytes());
                (WINSIZE, p)
            }
            Frame::Exit(s) => (EXIT, s.to_be_bytes().to_vec()),
            Frame::Ready(shell) => (READY, shell.as_bytes().to_vec()),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Writes the frame.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())?;
        w.flush()
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("console frame of {len} bytes (the limit is {MAX_FRAME})"),
            ));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        Ok(Some(match head[0] {
            DATA => Frame::Data(payload),
            WINSIZE if len == 4 => Frame::WindowSize {
                rows: u16::from_be_bytes([payload[0], payload[1]]),
                cols: u16::from_be_bytes([payload[2], payload[3]]),
            },
            EXIT if len == 4 => Frame::Exit(i32::from_be_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ])),
            READY => Frame::Ready(String::from_utf8_lossy(&payload).into_owned()),
            WINSIZE | EXIT => return Err(bad("console frame with a bad length")),
            k => return Err(bad(&format!("unknown console frame type {k}"))),
        }))
    }
}

/// Decodes the frame at the front of `buf`: `Ok(Some((frame, bytes used)))`, `Ok(None)` when
/// `buf` holds only part of one.
pub fn decode(buf: &[u8]) -> io::Result<Option<(Frame, usize)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len <= MAX_FRAME && buf.len() < 5 + len {
        return Ok(None);
    }
    let mut r = buf;
    match Frame::read_from(&mut r)? {
        Some(f) => Ok(Some((f, buf.len() - r.len()))),
        None => Ok(None),
    }
}

/// The hello line a client sends.
pub fn hello(rows: u16, cols: u16, term: &str) -> String {
    let term: String = term
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.+".contains(*c))
        .take(64)
        .collect();
    let term = if term.is_empty() {
        "vt100".into()
    } else {
        term
    };
    format!("{HELLO} {rows} {cols} {term}\n")
}

/// Parses a hello line (without its newline): rows, columns, TERM.
pub fn parse_hello(line: &str) -> Option<(u16, u16, String)> {
    let mut w = line.split_whitespace();
    if w.next()? != HELLO {
        return None;
    }
    let rows = w.next()?.parse().ok()?;
    let cols = w.next()?.parse().ok()?;
    let term = w.next().unwrap_or("vt100").to_string();
    Some((rows, cols, term))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Ready("/bin/sh".into()),
            Frame::Data(b"uname -r\r".to_vec()),
            Frame::WindowSize {
                rows: 50,
                cols: 132,
            },
            Frame::Exit(3),
            Frame::Exit(-1),
            Frame::Data(Vec::new()),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.write_to(&mut wire).expect("write");
        }
        let mut r = wire.as_slice();
        for f in &frames {
            assert_eq!(Frame::read_from(&mut r).expect("read").as_ref(), Some(f));
        }
        assert_eq!(Frame::read_from(&mut r).expect("end"), None);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut wire = Frame::Data(b"abc".to_vec()).encode();
        wire.extend(Frame::Exit(3).encode());
        for cut in 0..8 {
            assert_eq!(decode(&wire[..cut]).expect("partial"), None, "{cut}");
        }
        let (f, used) = decode(&wire).expect("ok").expect("frame");
        assert_eq!((f, used), (Frame::Data(b"abc".to_vec()), 8));
        let (f, _) = decode(&wire[used..]).expect("ok").expect("frame");
        assert_eq!(f, Frame::Exit(3));
        assert!(decode(&[0, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        for wire in [
            &[9u8, 0, 0, 0, 0][..],
            &[1, 0, 0, 0, 3, 1, 2, 3],
            &[0, 0xff, 0xff, 0xff, 0xff],
            &[0, 0, 0, 0, 5, 1],
            &[2, 0],
        ] {
            let mut r = wire;
            assert!(Frame::read_from(&mut r).is_err(), "{wire:?}");
        }
    }

    #[test]
    fn hello_lines() {
        let h = hello(24, 80, "xterm-256color");
        assert_eq!(h, "KATA-RS-CONSOLE/1 24 80 xterm-256color\n");
        assert_eq!(
            parse_hello(h.trim_end()),
            Some((24, 80, "xterm-256color".to_string()))
        );
        assert_eq!(hello(1, 2, "x;rm -rf /"), "KATA-RS-CONSOLE/1 1 2 xrm-rf\n");
        assert_eq!(parse_hello("ls -l"), None);
        assert_eq!(parse_hello("KATA-RS-CONSOLE/1 x 80"), None);
    }
}
