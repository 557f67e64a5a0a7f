//! Pictures of what the objective asks the model to match, for one augmented pair
//! (`poodle-train show-batch`). One PNG, three rows of three panels at crop resolution:
//!
//! 1. frame t's global crop with the K online subcrop boxes of direction 0 | frame t+dt's crop
//!    with the paired target boxes (same colour = same pair; dashed-looking thin boxes are
//!    unpaired targets cut from frame t) | the dense mask (white = the pixel carries loss);
//! 2. the online view (frame t after its affine) | the target view (frame t+dt after its own
//!    affine) | blank;
//! 3. the online view with its affine undone | the target view brought into the online frame
//!    by the flow and the affines exactly as the dense loss does it (`loss::dense`), zero
//!    where invalid | their absolute difference, masked (dark = they line up).
//!
//! If the warped target and the online view do not line up in row 3, the flow, its sign or an
//! affine convention is wrong.

use crate::data::augment::AugmentedPair;
use crate::loss::dense::{dense_aligned, Correspondence, TargetOrder};
use anyhow::Result;
use candle_core::{Device, Tensor};
use poodle_common::flowmath::Map;

/// Distinct box colours, cycled over the pairs.
const BOX_COLOURS: [[u8; 3]; 6] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
];

/// A map normalised with `mean` / `std` back to 8-bit RGB (row-major, interleaved).
fn to_rgb(m: &Map, mean: [f32; 3], std: [f32; 3]) -> Vec<u8> {
    let n = m.h * m.w;
    let mut px = m.clone();
    for c in 0..3 {
        for v in &mut px.data[c * n..(c + 1) * n] {
            *v = (*v * std[c] + mean[c]) * 255.0;
        }
    }
    px.to_hwc_u8()
}

fn rect(
    rgb: &mut [u8],
    w: usize,
    h: usize,
    b: &crate::data::crop::CropBox,
    colour: [u8; 3],
    thick: usize,
) {
    let mut put = |x: usize, y: usize| {
        if x < w && y < h {
            rgb[3 * (y * w + x)..3 * (y * w + x) + 3].copy_from_slice(&colour);
        }
    };
    let (x1, y1) = (b.x0 + b.w.max(1) - 1, b.y0 + b.h.max(1) - 1);
    for t in 0..thick {
        for x in b.x0..=x1 {
            put(x, b.y0 + t);
            put(x, y1.saturating_sub(t));
        }
        for y in b.y0..=y1 {
            put(b.x0 + t, y);
            put(x1.saturating_sub(t), y);
        }
    }
}

fn tensor(m: &Map) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        m.data.clone(),
        (1, m.c, m.h, m.w),
        &Device::Cpu,
    )?)
}

fn map_of(t: &Tensor) -> Result<Map> {
    let (_, c, h, w) = t.dims4()?;
    Ok(Map::from_vec(c, h, w, t.flatten_all()?.to_vec1::<f32>()?))
}

/// The picture of pair `a` (module docs): `(width, height, rgb)`.
/// `mean` / `std`: the normalisation the pair was augmented with.
pub fn pair_picture(
    a: &AugmentedPair,
    order: TargetOrder,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<(usize, usize, Vec<u8>)> {
    let rgb = |m: &Map| to_rgb(m, mean, std);
    let (h, w) = (a.crops[0].h, a.crops[0].w);
    let flow = tensor(&a.flow[0])?;
    let occ = Map::from_vec(
        1,
        h,
        w,
        a.occluded[0]
            .iter()
            .map(|&o| f32::from(u8::from(o)))
            .collect(),
    );
    let occ = tensor(&occ)?;
    let corr = Correspondence::new(
        &a.affines[..1],
        &a.target_affines[1..],
        &flow,
        &occ,
        (h, w),
        order,
    );
    let (z_o, z_t, m, _) =
        dense_aligned(&tensor(&a.views[0])?, &tensor(&a.target_views[1])?, &corr)?;
    let (z_o, z_t, m) = (map_of(&z_o)?, map_of(&z_t)?, map_of(&m)?);

    let mut crop_t = rgb(&a.crops[0]);
    let mut crop_tdt = rgb(&a.crops[1]);
    for (k, p) in a.subcrop_pairs[0].iter().enumerate() {
        let colour = BOX_COLOURS[k % BOX_COLOURS.len()];
        rect(&mut crop_t, w, h, &p.boxes[0], colour, 2);
        rect(
            &mut crop_tdt,
            w,
            h,
            &p.boxes[1],
            colour,
            if p.paired { 2 } else { 1 },
        );
    }
    let grey = |v: f32| [(v.clamp(0.0, 1.0) * 255.0) as u8; 3];
    let mask: Vec<u8> = m.data.iter().flat_map(|&v| grey(v)).collect();
    let (ro, rt) = (rgb(&z_o), rgb(&z_t));
    let diff: Vec<u8> = (0..h * w)
        .flat_map(|p| {
            let d = (0..3)
                .map(|c| (i32::from(ro[3 * p + c]) - i32::from(rt[3 * p + c])).abs())
                .sum::<i32>()
                / 3;
            let d = if m.data[p] > 0.0 { d.min(255) as u8 } else { 0 };
            [d, d, d]
        })
        .collect();
    let blank = vec![40u8; 3 * h * w];
    let panels = [
        [crop_t, crop_tdt, mask],
        [rgb(&a.views[0]), rgb(&a.target_views[1]), blank],
        [ro, rt, diff],
    ];
    let gap = 4;
    let (pw, ph) = (3 * w + 2 * gap, 3 * h + 2 * gap);
    let mut out = vec![255u8; 3 * pw * ph];
    for (r, row) in panels.iter().enumerate() {
        for (c, panel) in row.iter().enumerate() {
            let (ox, oy) = (c * (w + gap), r * (h + gap));
            for y in 0..h {
                let dst = 3 * ((oy + y) * pw + ox);
                out[dst..dst + 3 * w].copy_from_slice(&panel[3 * y * w..3 * (y + 1) * w]);
            }
        }
    }
    Ok((pw, ph, out))
}

/// Writes the picture of pair `pos` of pass `epoch` to `path` (the same augmentation the
/// batch holding it got); returns its metadata, or `None` when the pair is unreadable.
pub fn write_pair_picture(
    loader: &crate::data::loader::Loader,
    cfg: &crate::config::TrainConfig,
    epoch: u64,
    pos: usize,
    path: &std::path::Path,
) -> Result<Option<crate::data::loader::SampleMeta>> {
    let Some((a, meta)) = loader.augmented(epoch, pos) else {
        return Ok(None);
    };
    let colour = &cfg.augment.colour;
    let (w, h, rgb) = pair_picture(&a, cfg.method.dense_order, colour.mean, colour.std)?;
    poodle_common::flowmath::write_png_rgb(path, w as u32, h as u32, &rgb)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some(meta))
}

/// Writes the pictures of the first `count` pairs of pass `epoch` of `cfg`'s data to
/// `out/pair-<epoch>-<pos>.png`; returns the files written.
pub fn show_pairs(
    cfg: &crate::config::TrainConfig,
    epoch: u64,
    count: usize,
    out: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>> {
    let loader = crate::run::open_loader(cfg, &Device::Cpu)?;
    let mut written = Vec::new();
    for pos in 0..count {
        let path = out.join(format!("pair-{epoch}-{pos:03}.png"));
        let Some(meta) = write_pair_picture(&loader, cfg, epoch, pos, &path)? else {
            continue;
        };
        eprintln!(
            "{}: {} pair {} ({}, t {}, dt {})",
            path.display(),
            meta.store.display(),
            meta.pair,
            meta.video,
            meta.t,
            meta.dt
        );
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::colour::{IMAGENET_MEAN, IMAGENET_STD};

    #[test]
    fn unit_boxes_and_colours_round_trip() {
        let mut m = Map::zeros(3, 2, 2);
        for c in 0..3 {
            for p in 0..4 {
                m.data[c * 4 + p] = (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
        let rgb = to_rgb(&m, IMAGENET_MEAN, IMAGENET_STD);
        assert!(rgb.iter().all(|&v| v == 128 || v == 127), "{rgb:?}");
        let mut rgb = vec![0u8; 3 * 5 * 4];
        let b = crate::data::crop::CropBox {
            x0: 1,
            y0: 1,
            w: 3,
            h: 2,
        };
        rect(&mut rgb, 5, 4, &b, [9, 9, 9], 1);
        let on = |x: usize, y: usize| rgb[3 * (y * 5 + x)] == 9;
        assert!(on(1, 1) && on(3, 1) && on(1, 2) && on(3, 2) && on(2, 1));
        assert!(!on(0, 0) && !on(4, 3) && !on(2, 3));
    }
}
