//! Frame-exact decoding through ffmpeg (ffmpeg-sidecar).
//!
//! Frames are selected by the index of the decoded frame (`select=eq(n,K)`), never by time
//! seeks, which drift on BDD100K. `-fps_mode passthrough` keeps ffmpeg from duplicating or
//! dropping frames of variable-frame-rate videos, and ffmpeg's default autorotation applies
//! the rotation metadata before the filter chain, so frame k is the k-th displayed frame.

use crate::{PrepError, Result};
use ffmpeg_sidecar::command::FfmpegCommand;
use ffmpeg_sidecar::event::{FfmpegEvent, LogLevel};
use std::collections::BTreeMap;
use std::path::Path;

/// An RGB frame, interleaved (H, W, 3).
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub height: usize,
    pub width: usize,
    pub rgb: Vec<u8>,
}

impl Frame {
    /// Planar (3, H, W) copy, the store's layout.
    pub fn to_planar(&self) -> Vec<u8> {
        let n = self.height * self.width;
        let mut out = vec![0u8; 3 * n];
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            out[i] = px[0];
            out[n + i] = px[1];
            out[2 * n + i] = px[2];
        }
        out
    }
}

fn scale_filter(height: usize, width: usize) -> String {
    // Area averaging when shrinking (no aliasing), bicubic when enlarging.
    format!("scale={width}:{height}:flags=area+accurate_rnd+full_chroma_int,format=rgb24")
}

/// Decodes the frames with the given indices (0-based decoded-frame counts) of a video,
/// resized to (height, width). Frames past the end of the video are missing from the map:
/// the caller decides what a missing frame means.
pub fn decode_frames(
    path: &Path,
    indices: &[u64],
    height: usize,
    width: usize,
) -> Result<BTreeMap<u64, Frame>> {
    let mut out = BTreeMap::new();
    stream_frames(path, indices, height, width, &mut |k, f| {
        out.insert(k, f);
        true
    })?;
    Ok(out)
}

/// Like [`decode_frames`], but hands each frame to `on_frame` as soon as it is decoded (in
/// increasing index order), so a long video's frames need not all be held at once. Stops
/// early when `on_frame` returns false. Returns how many frames were delivered.
pub fn stream_frames(
    path: &Path,
    indices: &[u64],
    height: usize,
    width: usize,
    on_frame: &mut dyn FnMut(u64, Frame) -> bool,
) -> Result<usize> {
    let wanted: Vec<u64> = {
        let mut v = indices.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    if wanted.is_empty() {
        return Ok(0);
    }
    let select: Vec<String> = wanted.iter().map(|k| format!("eq(n\\,{k})")).collect();
    let filter = format!(
        "select='{}',{}",
        select.join("+"),
        scale_filter(height, width)
    );
    let mut cmd = FfmpegCommand::new();
    cmd.hide_banner()
        .args(["-nostdin", "-threads", "2"])
        .input(path.as_os_str())
        .args(["-map", "0:v:0", "-an", "-sn", "-dn"])
        .filter(filter)
        .fps_mode("passthrough")
        .rawvideo();
    run_stream(cmd, path, &wanted, height, width, on_frame)
}

/// Decodes a single image file (PNG, JPEG, ...) resized to (height, width).
pub fn decode_image(path: &Path, height: usize, width: usize) -> Result<Frame> {
    let mut cmd = FfmpegCommand::new();
    cmd.hide_banner()
        .args(["-nostdin"])
        .input(path.as_os_str())
        .args(["-frames:v", "1"])
        .filter(scale_filter(height, width))
        .rawvideo();
    let mut frame = None;
    run_stream(cmd, path, &[0], height, width, &mut |_, f| {
        frame = Some(f);
        false
    })?;
    frame.ok_or_else(|| PrepError::Video {
        path: path.display().to_string(),
        reason: "no image decoded".into(),
    })
}

fn run_stream(
    mut cmd: FfmpegCommand,
    path: &Path,
    wanted: &[u64],
    height: usize,
    width: usize,
    on_frame: &mut dyn FnMut(u64, Frame) -> bool,
) -> Result<usize> {
    let err = |reason: String| PrepError::Video {
        path: path.display().to_string(),
        reason,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| err(format!("cannot start ffmpeg: {e}")))?;
    let iter = child
        .iter()
        .map_err(|e| err(format!("cannot read ffmpeg output: {e}")))?;
    let mut delivered = 0;
    let mut errors: Vec<String> = Vec::new();
    let mut next = wanted.iter();
    for event in iter {
        match event {
            FfmpegEvent::OutputFrame(f) => {
                if f.width as usize != width || f.height as usize != height {
                    errors.push(format!(
                        "ffmpeg gave a {}x{} frame, expected {width}x{height}",
                        f.width, f.height
                    ));
                    break;
                }
                // Selected frames arrive in decode order: the k-th output is the k-th wanted.
                let Some(&k) = next.next() else { break };
                delivered += 1;
                let frame = Frame {
                    height,
                    width,
                    rgb: f.data,
                };
                if !on_frame(k, frame) || delivered == wanted.len() {
                    break; // no need to decode the rest of the video
                }
            }
            FfmpegEvent::Log(LogLevel::Error | LogLevel::Fatal, msg) if errors.len() < 5 => {
                errors.push(msg)
            }
            FfmpegEvent::Error(msg) if errors.len() < 5 => errors.push(msg),
            _ => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if delivered == 0 && !errors.is_empty() {
        return Err(err(errors.join("; ")));
    }
    Ok(delivered)
}
