//! Labelled segmentation datasets for the readout evaluations: file layouts, class names and
//! palettes, image and label decoding, and the resizing the readout applies.
//!
//! # Layouts (`root` is the folder passed as `--root`)
//! | dataset | images | labels | classes | ignored |
//! | --- | --- | --- | --- | --- |
//! | `camvid` (SegNet's copy) | `{split}/*.png` | `{split}annot/<same name>` (uint8 ids) | 11 | 11 (void) |
//! | `bdd100k` (10k sem_seg) | `images/10k/{split}/*.jpg` | `labels/sem_seg/masks/{split}/<stem>.png` | 19 | 255 |
//! | `cityscapes` | `leftImg8bit/{split}/{city}/*_leftImg8bit.png` | `gtFine/{split}/{city}/*_gtFine_labelTrainIds.png` | 19 | 255 |
//!
//! Cityscapes' `*_labelTrainIds.png` are not in the download: cityscapesScripts'
//! `createTrainIdLabelImgs.py` writes them. BDD100K's masks are the 8-bit train-id PNGs of
//! `bdd100k_sem_seg_labels_trainval` (`labels/sem_seg/masks`). Label PNGs must be 8-bit
//! greyscale or palette images whose raw values are class ids; every value `>= num_classes`
//! is ignored (CamVid's 11, the 255 of the others). Images whose label file is missing are
//! skipped and counted.
//!
//! Images (PNG, BDD's JPEGs) are decoded with the `image` crate; label PNGs with the `png`
//! crate, which keeps palette indices.

use crate::data::colour::{IMAGENET_MEAN, IMAGENET_STD};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A dataset the readout knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Camvid,
    Bdd100k,
    Cityscapes,
}

/// The 19 Cityscapes train-id classes, which BDD100K uses too, in id order.
pub const CITYSCAPES_CLASSES: [&str; 19] = [
    "Road",
    "Sidewalk",
    "Building",
    "Wall",
    "Fence",
    "Pole",
    "Traffic Light",
    "Traffic Sign",
    "Vegetation",
    "Terrain",
    "Sky",
    "Person",
    "Rider",
    "Car",
    "Truck",
    "Bus",
    "Train",
    "Motorcycle",
    "Bicycle",
];

/// Cityscapes' official colours for the 19 train ids.
pub const CITYSCAPES_PALETTE: [[u8; 3]; 19] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [102, 102, 156],
    [190, 153, 153],
    [153, 153, 153],
    [250, 170, 30],
    [220, 220, 0],
    [107, 142, 35],
    [152, 251, 152],
    [70, 130, 180],
    [220, 20, 60],
    [255, 0, 0],
    [0, 0, 142],
    [0, 0, 70],
    [0, 60, 100],
    [0, 80, 100],
    [0, 0, 230],
    [119, 11, 32],
];

/// CamVid's 11 classes as SegNet numbers them (ids 0..10).
pub const CAMVID_CLASSES: [&str; 11] = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
];

/// SegNet's CamVid colours (`label_colours` of the SegNet tutorial's
/// `Scripts/test_segmentation_camvid.py`).
pub const CAMVID_PALETTE: [[u8; 3]; 11] = [
    [128, 128, 128],
    [128, 0, 0],
    [192, 192, 128],
    [128, 64, 128],
    [60, 40, 222],
    [128, 128, 0],
    [192, 128, 128],
    [64, 64, 128],
    [64, 0, 128],
    [64, 64, 0],
    [0, 128, 192],
];

/// Colour of ignored pixels in visualisations.
pub const IGNORE_COLOUR: [u8; 3] = [0, 0, 0];

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Camvid => "camvid",
            DatasetKind::Bdd100k => "bdd100k",
            DatasetKind::Cityscapes => "cityscapes",
        }
    }

    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            DatasetKind::Camvid => &CAMVID_CLASSES,
            _ => &CITYSCAPES_CLASSES,
        }
    }

    pub fn num_classes(self) -> usize {
        self.class_names().len()
    }

    pub fn palette(self) -> &'static [[u8; 3]] {
        match self {
            DatasetKind::Camvid => &CAMVID_PALETTE,
            _ => &CITYSCAPES_PALETTE,
        }
    }

    /// The readout's default input size (height, width): multiples of 32 (the decoder needs
    /// C3, C4 and C5 to align) with the source aspect ratio. CamVid 360x480 -> 192x256
    /// (3:4, CPU-sized); BDD100K 720x1280 -> 288x512 (exactly 9:16); Cityscapes
    /// 1024x2048 -> 256x512 (1:2).
    pub fn default_size(self) -> (usize, usize) {
        match self {
            DatasetKind::Camvid => (192, 256),
            DatasetKind::Bdd100k => (288, 512),
            DatasetKind::Cityscapes => (256, 512),
        }
    }

    /// The labelled images of a split, sorted by image path, and how many images were skipped
    /// for lack of a label file.
    pub fn list(self, root: &Path, split: &str) -> Result<(Vec<Sample>, usize)> {
        let (images, label_of): (Vec<PathBuf>, LabelOf) = match self {
            DatasetKind::Camvid => {
                let dir = root.join(split);
                let ann = root.join(format!("{split}annot"));
                (
                    files_with(&dir, &["png"])?,
                    Box::new(move |p: &Path| Some(ann.join(p.file_name()?))),
                )
            }
            DatasetKind::Bdd100k => {
                let dir = root.join("images/10k").join(split);
                let ann = root.join("labels/sem_seg/masks").join(split);
                (
                    files_with(&dir, &["jpg", "jpeg", "png"])?,
                    Box::new(move |p: &Path| {
                        Some(ann.join(format!("{}.png", p.file_stem()?.to_str()?)))
                    }),
                )
            }
            DatasetKind::Cityscapes => {
                let dir = root.join("leftImg8bit").join(split);
                let ann = root.join("gtFine").join(split);
                let mut images = Vec::new();
                for city in subdirs(&dir)? {
                    images.extend(
                        files_with(&city, &["png"])?
                            .into_iter()
                            .filter(|p| name_of(p).ends_with("_leftImg8bit.png")),
                    );
                }
                images.sort();
                (
                    images,
                    Box::new(move |p: &Path| {
                        let city = p.parent()?.file_name()?;
                        let base = name_of(p).strip_suffix("_leftImg8bit.png")?.to_string();
                        Some(
                            ann.join(city)
                                .join(format!("{base}_gtFine_labelTrainIds.png")),
                        )
                    }),
                )
            }
        };
        let mut out = Vec::with_capacity(images.len());
        let mut skipped = 0;
        for image in images {
            match label_of(&image).filter(|l| l.is_file()) {
                Some(label) => out.push(Sample { image, label }),
                None => skipped += 1,
            }
        }
        ensure!(
            !out.is_empty(),
            "{}: no labelled images in split {split:?} under {} (expected layout: see poodle_train::eval::datasets)",
            self.name(),
            root.display()
        );
        Ok((out, skipped))
    }
}

/// Where an image's label file is.
type LabelOf = Box<dyn Fn(&Path) -> Option<PathBuf>>;

/// One labelled image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub image: PathBuf,
    pub label: PathBuf,
}

fn name_of(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn files_with(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "{}: cannot list the split's images (wrong --root, --dataset or split? layouts: poodle_train::eval::datasets)",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "{}: cannot list the split's city folders (wrong --root or split?)",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    Ok(v)
}

/// An 8-bit RGB image, row-major HWC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// A label map of class ids, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes an image (PNG of any colour type or depth, JPEG; the format from the file's
/// content) to 8-bit RGB with the `image` crate.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("{}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}", path.display()))?
        .decode()
        .with_context(|| format!("{}: cannot decode the image", path.display()))?
        .into_rgb8();
    Ok(RgbImage {
        width: img.width() as usize,
        height: img.height() as usize,
        data: img.into_raw(),
    })
}

/// Reads a label PNG: 8-bit greyscale or palette, raw values taken as class ids (with the
/// `png` crate: a general image decoder expands palettes to colours and loses the ids).
pub fn read_label(path: &Path) -> Result<LabelMap> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(f));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{}", path.display()))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}", path.display()))?;
    ensure!(
        matches!(
            info.color_type,
            png::ColorType::Grayscale | png::ColorType::Indexed
        ) && info.bit_depth == png::BitDepth::Eight,
        "{}: label PNGs must be 8-bit greyscale or palette ids, not {:?} {:?}",
        path.display(),
        info.color_type,
        info.bit_depth
    );
    let (w, h) = (info.width as usize, info.height as usize);
    let data = buf[..info.buffer_size()].to_vec();
    ensure!(data.len() == w * h, "{}: bad label size", path.display());
    Ok(LabelMap {
        width: w,
        height: h,
        data,
    })
}

/// Resampling weights for one axis, PIL-style "bilinear" (a triangle filter widened by the
/// scale when downsampling, so downscaling averages instead of aliasing): for each output
/// index, the first input index and the normalised weights.
fn axis_weights(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = n_in as f64 / n_out as f64;
    let support = scale.max(1.0);
    (0..n_out)
        .map(|o| {
            let centre = (o as f64 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0)) as usize;
            let hi = ((centre + support).ceil() as usize).min(n_in);
            let mut w: Vec<f32> = (lo..hi)
                .map(|i| (1.0 - ((i as f64 + 0.5 - centre) / support).abs()).max(0.0) as f32)
                .collect();
            let s: f32 = w.iter().sum();
            if s > 0.0 {
                w.iter_mut().for_each(|v| *v /= s);
            } else {
                // Cannot happen for n_in >= 1; keep nearest as a fallback.
                w = vec![1.0];
                return ((centre as usize).min(n_in - 1), w);
            }
            (lo, w)
        })
        .collect()
}

/// Resizes an RGB image to `h x w` (antialiased bilinear) and returns it as CHW f32,
/// normalised with the ImageNet mean and std.
pub fn resize_normalise(img: &RgbImage, h: usize, w: usize) -> Vec<f32> {
    let (wi, hi) = (img.width, img.height);
    let xw = axis_weights(wi, w);
    let yw = axis_weights(hi, h);
    // Horizontal pass: (hi, w, 3).
    let mut tmp = vec![0f32; hi * w * 3];
    for y in 0..hi {
        let row = &img.data[y * wi * 3..(y + 1) * wi * 3];
        for (x, (lo, ws)) in xw.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, wt) in ws.iter().enumerate() {
                let p = &row[(lo + k) * 3..(lo + k) * 3 + 3];
                for c in 0..3 {
                    acc[c] += wt * p[c] as f32;
                }
            }
            tmp[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass straight into normalised CHW.
    let mut out = vec![0f32; 3 * h * w];
    for (y, (lo, ws)) in yw.iter().enumerate() {
        for x in 0..w {
            let mut acc = [0f32; 3];
            for (k, wt) in ws.iter().enumerate() {
                let p = &tmp[((lo + k) * w + x) * 3..((lo + k) * w + x) * 3 + 3];
                for c in 0..3 {
                    acc[c] += wt * p[c];
                }
            }
            for c in 0..3 {
                out[c * h * w + y * w + x] = (acc[c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
    }
    out
}

/// Nearest-neighbour resize of an 8-bit RGB image (visualisations).
pub fn resize_rgb_nearest(img: &RgbImage, h: usize, w: usize) -> RgbImage {
    let mut data = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        let sy = nearest_index(y, img.height, h);
        for x in 0..w {
            let sx = nearest_index(x, img.width, w);
            let i = (sy * img.width + sx) * 3;
            data.extend_from_slice(&img.data[i..i + 3]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// Source index of output index `o` for nearest resampling by pixel centres.
pub fn nearest_index(o: usize, n_in: usize, n_out: usize) -> usize {
    (((o as f64 + 0.5) * n_in as f64 / n_out as f64) as usize).min(n_in - 1)
}

/// Nearest-neighbour resize of a label map (pixel centres).
pub fn resize_label_nearest(l: &LabelMap, h: usize, w: usize) -> LabelMap {
    let xs: Vec<usize> = (0..w).map(|x| nearest_index(x, l.width, w)).collect();
    let mut data = Vec::with_capacity(h * w);
    for y in 0..h {
        let sy = nearest_index(y, l.height, h);
        let row = &l.data[sy * l.width..(sy + 1) * l.width];
        data.extend(xs.iter().map(|&sx| row[sx]));
    }
    LabelMap {
        width: w,
        height: h,
        data,
    }
}

/// Colours a label map: ids below the palette's length get their colour, others
/// [`IGNORE_COLOUR`].
pub fn colourise(ids: &[u8], palette: &[[u8; 3]]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&i| palette.get(i as usize).copied().unwrap_or(IGNORE_COLOUR))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_and_jpeg_decode_to_rgb_whatever_the_extension() {
        let d = std::env::temp_dir().join(format!("poodle-img-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let rgb = image::RgbImage::from_raw(2, 1, vec![1, 2, 3, 250, 128, 7]).unwrap();
        rgb.save(d.join("a.png")).unwrap();
        let got = read_rgb(&d.join("a.png")).unwrap();
        assert_eq!(
            (got.width, got.height, got.data),
            (2, 1, vec![1, 2, 3, 250, 128, 7])
        );
        // Greyscale is replicated to three channels.
        image::GrayImage::from_raw(1, 1, vec![9])
            .unwrap()
            .save(d.join("g.png"))
            .unwrap();
        assert_eq!(read_rgb(&d.join("g.png")).unwrap().data, vec![9, 9, 9]);
        // A JPEG (lossy: a flat colour comes back within a few levels), even named .png.
        let flat = image::RgbImage::from_pixel(16, 8, image::Rgb([200, 40, 90]));
        flat.save_with_format(d.join("j.png"), image::ImageFormat::Jpeg)
            .unwrap();
        let j = read_rgb(&d.join("j.png")).unwrap();
        assert_eq!((j.width, j.height), (16, 8));
        for (i, &v) in j.data.iter().enumerate() {
            assert!((i32::from(v) - [200, 40, 90][i % 3]).abs() <= 4, "{i}: {v}");
        }
        let e = read_rgb(&d.join("missing.jpg")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.jpg"), "{e:#}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn resampling_weights_sum_to_one_and_identity_is_exact() {
        for (a, b) in [(480, 256), (360, 192), (10, 10), (4, 9)] {
            for (_, w) in axis_weights(a, b) {
                let s: f32 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-5);
            }
        }
        let img = RgbImage {
            width: 3,
            height: 2,
            data: (0..18).map(|v| v as u8 * 10).collect(),
        };
        let out = resize_normalise(&img, 2, 3);
        // Same size: pixel (y=1, x=2) of channel 1 is 10 * (3*(1*3+2)+1).
        let v = 10.0 * 16.0;
        let expect = (v / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1];
        assert!((out[6 + 5] - expect).abs() < 1e-5);
        // 2x downscale of a constant image stays constant.
        let flat = RgbImage {
            width: 8,
            height: 4,
            data: vec![200; 96],
        };
        let o = resize_normalise(&flat, 2, 4);
        let e = (200.0 / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        assert!(o[..8].iter().all(|v| (v - e).abs() < 1e-5));
    }

    #[test]
    fn nearest_label_resize_picks_pixel_centres() {
        let l = LabelMap {
            width: 4,
            height: 2,
            data: vec![0, 1, 2, 3, 4, 5, 6, 7],
        };
        let r = resize_label_nearest(&l, 1, 2);
        // Output centres at x = 1.0 and 3.0 in input pixels -> indices 1 and 3; y = 1.0 -> row 1.
        assert_eq!(r.data, vec![5, 7]);
        let up = resize_label_nearest(&l, 4, 8);
        assert_eq!(&up.data[..8], &[0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(
            colourise(&[0, 11], &CAMVID_PALETTE),
            vec![128, 128, 128, 0, 0, 0]
        );
    }
}
