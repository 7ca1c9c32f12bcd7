//! Tar archives written byte by byte, hostile names included (`..`, absolute, through a symlink,
//! hard links out, devices, absurd sizes, GNU long names, PAX paths).

/// One entry of a tar archive written byte by byte: names and link targets exactly as given.
#[derive(Clone, Debug)]
pub struct TarEntry {
    pub name: String,
    /// `0` file, `1` hard link, `2` symlink, `3` char device, `4` block device, `5` directory,
    /// `6` fifo.
    pub typeflag: u8,
    pub link: String,
    pub data: Vec<u8>,
    /// The size the header claims when it is not `data.len()`.
    pub header_size: Option<u64>,
    pub mode: u32,
    pub dev: (u32, u32),
    /// A PAX `path` record before the entry (readers take it over `name`).
    pub pax_path: Option<String>,
}

impl TarEntry {
    fn new(name: &str, typeflag: u8) -> TarEntry {
        TarEntry {
            name: name.to_string(),
            typeflag,
            link: String::new(),
            data: Vec::new(),
            header_size: None,
            mode: if typeflag == b'5' { 0o755 } else { 0o644 },
            dev: (0, 0),
            pax_path: None,
        }
    }
    pub fn file(name: &str, data: &[u8]) -> TarEntry {
        TarEntry {
            data: data.to_vec(),
            ..TarEntry::new(name, b'0')
        }
    }
    pub fn dir(name: &str) -> TarEntry {
        TarEntry::new(name, b'5')
    }
    pub fn symlink(name: &str, target: &str) -> TarEntry {
        TarEntry {
            link: target.to_string(),
            mode: 0o777,
            ..TarEntry::new(name, b'2')
        }
    }
    pub fn hard_link(name: &str, target: &str) -> TarEntry {
        TarEntry {
            link: target.to_string(),
            ..TarEntry::new(name, b'1')
        }
    }
    pub fn char_device(name: &str, major: u32, minor: u32) -> TarEntry {
        TarEntry {
            dev: (major, minor),
            ..TarEntry::new(name, b'3')
        }
    }
    pub fn block_device(name: &str, major: u32, minor: u32) -> TarEntry {
        TarEntry {
            dev: (major, minor),
            ..TarEntry::new(name, b'4')
        }
    }
    pub fn fifo(name: &str) -> TarEntry {
        TarEntry::new(name, b'6')
    }
    /// The header claims `size` bytes whatever the data.
    pub fn with_header_size(mut self, size: u64) -> TarEntry {
        self.header_size = Some(size);
        self
    }
    /// The mode the header gives.
    pub fn with_mode(mut self, mode: u32) -> TarEntry {
        self.mode = mode;
        self
    }
    /// A PAX `path` record says the entry's name is `path`.
    pub fn with_pax_path(mut self, path: &str) -> TarEntry {
        self.pax_path = Some(path.to_string());
        self
    }
}

fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    assert!(
        s.len() <= digits,
        "{v} does not fit in {digits} octal digits"
    );
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

fn header(
    name: &[u8],
    typeflag: u8,
    link: &[u8],
    size: u64,
    mode: u32,
    dev: (u32, u32),
) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    if size < 0o77777777777 {
        octal(&mut h[124..136], size);
    } else {
        // GNU base-256: high bit set, big-endian in the rest of the field.
        let f = &mut h[124..136];
        f.fill(0);
        f[4..].copy_from_slice(&size.to_be_bytes());
        f[0] = 0x80;
    }
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = typeflag;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar ");
    h[263..265].copy_from_slice(b" \0");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    octal(&mut h[329..337], u64::from(dev.0));
    octal(&mut h[337..345], u64::from(dev.1));
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn push_padded(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// A tar archive of `entries` (GNU format: names over 100 bytes go in a long-name entry).
pub fn tar_archive(entries: &[TarEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if let Some(p) = &e.pax_path {
            let rec = pax_record("path", p);
            out.extend_from_slice(&header(
                b"PaxHeaders/x",
                b'x',
                b"",
                rec.len() as u64,
                0o644,
                (0, 0),
            ));
            push_padded(&mut out, &rec);
        }
        for (field, flag) in [(&e.name, b'L'), (&e.link, b'K')] {
            if field.len() > 100 {
                let mut v = field.as_bytes().to_vec();
                v.push(0);
                out.extend_from_slice(&header(
                    b"././@LongLink",
                    flag,
                    b"",
                    v.len() as u64,
                    0o644,
                    (0, 0),
                ));
                push_padded(&mut out, &v);
            }
        }
        let size = e.header_size.unwrap_or(e.data.len() as u64);
        out.extend_from_slice(&header(
            e.name.as_bytes(),
            e.typeflag,
            e.link.as_bytes(),
            size,
            e.mode,
            e.dev,
        ));
        push_padded(&mut out, &e.data);
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// A checkpoint blob as containerd stores one: a tar of the checkpoint directory, here holding
/// `files` (name, content) only.
pub fn checkpoint_blob(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let entries: Vec<TarEntry> = files.iter().map(|(n, d)| TarEntry::file(n, d)).collect();
    tar_archive(&entries)
}
