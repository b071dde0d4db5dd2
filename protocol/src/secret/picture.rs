//! The key picture: a 12 × 12 grid in four colours, rendered as SVG, PNG or
//! a terminal drawing. Renderings are deterministic byte for byte, so both
//! devices produce identical files.

use super::fingerprint::Fingerprint;

/// Palette (RGB): white, light blue, dark blue, bright blue.
pub const PALETTE: [[u8; 3]; 4] = [
    [0xff, 0xff, 0xff],
    [0xd5, 0xe6, 0xf3],
    [0x2d, 0x57, 0x75],
    [0x2f, 0x99, 0xc9],
];
pub const GRID: usize = 12;

pub struct KeyPicture {
    cells: [u8; GRID * GRID],
}

impl KeyPicture {
    pub fn new(fingerprint: &Fingerprint) -> Self {
        Self {
            cells: fingerprint.cells(),
        }
    }

    fn cell(&self, x: usize, y: usize) -> [u8; 3] {
        PALETTE[usize::from(self.cells[y * GRID + x] & 3)]
    }

    pub fn svg(&self) -> String {
        let mut out = String::from(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 12 12\" width=\"240\" height=\"240\" shape-rendering=\"crispEdges\">\n",
        );
        for y in 0..GRID {
            for x in 0..GRID {
                let [r, g, b] = self.cell(x, y);
                out.push_str(&format!(
                    "<rect x=\"{x}\" y=\"{y}\" width=\"1\" height=\"1\" fill=\"#{r:02x}{g:02x}{b:02x}\"/>\n"
                ));
            }
        }
        out.push_str("</svg>\n");
        out
    }

    /// Two terminal columns per cell, 24-bit colour.
    pub fn terminal(&self) -> String {
        let mut out = String::new();
        for y in 0..GRID {
            for x in 0..GRID {
                let [r, g, b] = self.cell(x, y);
                out.push_str(&format!("\x1b[48;2;{r};{g};{b}m  "));
            }
            out.push_str("\x1b[0m\n");
        }
        out
    }

    /// A PNG of `scale` pixels per cell (RGB, 8 bits, uncompressed deflate).
    pub fn png(&self, scale: usize) -> Vec<u8> {
        let scale = scale.clamp(1, 64);
        let side = GRID * scale;
        let mut raw = Vec::with_capacity(side * (1 + side * 3));
        for py in 0..side {
            raw.push(0); // filter: none
            for px in 0..side {
                raw.extend_from_slice(&self.cell(px / scale, py / scale));
            }
        }
        let side = side as u32;
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // depth 8, RGB, deflate, no filter, no interlace
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &zlib_stored(&raw));
        chunk(&mut png, b"IEND", &[]);
        png
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream of stored (uncompressed) deflate blocks: tiny pictures do
/// not need compression, and this keeps the bytes fixed forever.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let mut blocks = data.chunks(65_535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        out.push(u8::from(blocks.peek().is_none()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn renderings_are_deterministic_and_depend_on_the_fingerprint() {
        let f = Fingerprint::from_handshake_hash(b"h");
        let g = Fingerprint::from_handshake_hash(b"i");
        let (p, q) = (KeyPicture::new(&f), KeyPicture::new(&f));
        assert_eq!(p.png(20), q.png(20));
        assert_eq!(p.svg(), q.svg());
        assert_ne!(p.png(20), KeyPicture::new(&g).png(20));
        assert_ne!(p.svg(), KeyPicture::new(&g).svg());
        assert_eq!(p.terminal().lines().count(), GRID);
    }

    #[test]
    fn png_structure_is_valid() {
        let png = KeyPicture::new(&Fingerprint::from_handshake_hash(b"h")).png(20);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 240);
        // Walk the chunks and check every CRC.
        let mut at = 8;
        let mut kinds = Vec::new();
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let body = &png[at + 4..at + 8 + len];
            let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().unwrap());
            assert_eq!(crc32(body), crc);
            kinds.push(String::from_utf8(body[..4].to_vec()).unwrap());
            at += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
    }
}
