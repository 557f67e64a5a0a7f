//! Segmentation metrics as pure functions: the confusion matrix, IoU per class, mIoU, pixel
//! accuracy, and the paper's class groups (Table 3 / Appendix F, Table 7).
//!
//! # Conventions
//! * Labels `>= k` (the number of classes) are ignored: they count nowhere.
//! * IoU of class c = TP / (TP + FP + FN). A class with an empty union (neither in the
//!   ground truth nor predicted) has no IoU (`None`); means are over the classes that have
//!   one (NumPy's `nanmean`, as mmsegmentation). A class predicted but absent from the ground
//!   truth has IoU 0 and counts.
//! * Class statistics come from the training labels (Appendix F): the average over images of
//!   the share of the image's labelled pixels that are the class ("Avg Pix. % / Im."), the
//!   share of all labelled pixels ("Total % of Pix.") and the share of images in which the
//!   class appears ("Total % of Im."). Images without a labelled pixel are left out.
//! * Groups: **small** if the average pixel share per image is below 1% (else large);
//!   **rare** if it appears in fewer than 20% of images (else common).

use serde::{Deserialize, Serialize};

/// The paper's thresholds: small below 1% average pixel share, rare below 20% of images.
pub const SMALL_SHARE: f64 = 0.01;
pub const RARE_SHARE: f64 = 0.20;

/// `k x k` confusion counts, `m[gt * k + pred]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub k: usize,
    pub m: Vec<u64>,
}

impl Confusion {
    pub fn new(k: usize) -> Self {
        Confusion {
            k,
            m: vec![0; k * k],
        }
    }

    /// Counts one labelled map against its prediction (same length); ground-truth values
    /// `>= k` are ignored. A prediction `>= k` is a bug and panics.
    pub fn add(&mut self, gt: &[u8], pred: &[u8]) {
        assert_eq!(gt.len(), pred.len(), "ground truth and prediction differ");
        let k = self.k;
        for (&g, &p) in gt.iter().zip(pred) {
            let (g, p) = (g as usize, p as usize);
            if g < k {
                assert!(p < k, "prediction {p} out of {k} classes");
                self.m[g * k + p] += 1;
            }
        }
    }

    pub fn merge(&mut self, other: &Confusion) {
        assert_eq!(self.k, other.k);
        for (a, b) in self.m.iter_mut().zip(&other.m) {
            *a += b;
        }
    }

    /// The matrix as an RGB picture, `(width, height, rgb)`: row `g` (ground truth) and column
    /// `p` (prediction) of `cell` x `cell` pixels, shaded from white (0) to dark blue (the whole
    /// row: each row is normalised by its class's pixels, so the diagonal reads as recall).
    /// A strip of one cell left of the rows and above the columns shows each class's palette
    /// colour, so classes are told apart without text.
    pub fn picture(&self, cell: usize, palette: &[[u8; 3]]) -> (usize, usize, Vec<u8>) {
        let (k, side) = (self.k, (self.k + 1) * cell);
        let mut rgb = vec![255u8; side * side * 3];
        let mut fill = |r: usize, c: usize, colour: [u8; 3]| {
            for y in r * cell..(r + 1) * cell {
                for x in c * cell..(c + 1) * cell {
                    rgb[(y * side + x) * 3..(y * side + x) * 3 + 3].copy_from_slice(&colour);
                }
            }
        };
        for i in 0..k {
            let colour = palette.get(i).copied().unwrap_or([0, 0, 0]);
            fill(i + 1, 0, colour);
            fill(0, i + 1, colour);
            let row: u64 = (0..k).map(|j| self.get(i, j)).sum();
            for j in 0..k {
                let f = if row == 0 {
                    0.0
                } else {
                    self.get(i, j) as f64 / row as f64
                };
                // White -> (8, 48, 107), the dark end of a blue colour map.
                let shade = |lo: f64| (255.0 + f * (lo - 255.0)).round() as u8;
                fill(i + 1, j + 1, [shade(8.0), shade(48.0), shade(107.0)]);
            }
        }
        (side, side, rgb)
    }

    pub fn get(&self, gt: usize, pred: usize) -> u64 {
        self.m[gt * self.k + pred]
    }

    /// Labelled pixels counted.
    pub fn total(&self) -> u64 {
        self.m.iter().sum()
    }

    /// Ground-truth pixels of each class (row sums).
    pub fn gt_counts(&self) -> Vec<u64> {
        (0..self.k)
            .map(|g| (0..self.k).map(|p| self.get(g, p)).sum())
            .collect()
    }

    /// Predicted pixels of each class (column sums), labelled pixels only.
    pub fn pred_counts(&self) -> Vec<u64> {
        (0..self.k)
            .map(|p| (0..self.k).map(|g| self.get(g, p)).sum())
            .collect()
    }

    /// IoU per class; `None` where the union is empty.
    pub fn iou(&self) -> Vec<Option<f64>> {
        let (gt, pr) = (self.gt_counts(), self.pred_counts());
        (0..self.k)
            .map(|c| {
                let tp = self.get(c, c);
                let union = gt[c] + pr[c] - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes that have one (0 if none does).
    pub fn miou(&self) -> f64 {
        mean_defined(&self.iou()).unwrap_or(0.0)
    }

    /// Correct labelled pixels over labelled pixels (0 if none).
    pub fn pixel_acc(&self) -> f64 {
        let t = self.total();
        if t == 0 {
            return 0.0;
        }
        (0..self.k).map(|c| self.get(c, c)).sum::<u64>() as f64 / t as f64
    }

    /// Recall per class (TP / ground-truth pixels); `None` for classes absent from the
    /// ground truth.
    pub fn class_acc(&self) -> Vec<Option<f64>> {
        self.gt_counts()
            .iter()
            .enumerate()
            .map(|(c, &n)| (n > 0).then(|| self.get(c, c) as f64 / n as f64))
            .collect()
    }
}

/// Mean of the defined values; `None` if there are none.
pub fn mean_defined(v: &[Option<f64>]) -> Option<f64> {
    let d: Vec<f64> = v.iter().flatten().copied().collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

/// Mean of the defined IoUs of the classes in `members`.
pub fn group_miou(iou: &[Option<f64>], members: &[usize]) -> Option<f64> {
    let v: Vec<Option<f64>> = members.iter().map(|&c| iou[c]).collect();
    mean_defined(&v)
}

/// Running per-class statistics over label maps (Appendix F, Table 7).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassStatsAccumulator {
    k: usize,
    images: u64,
    share_sum: Vec<f64>,
    present: Vec<u64>,
    pixels: Vec<u64>,
}

impl ClassStatsAccumulator {
    pub fn new(k: usize) -> Self {
        ClassStatsAccumulator {
            k,
            images: 0,
            share_sum: vec![0.0; k],
            present: vec![0; k],
            pixels: vec![0; k],
        }
    }

    /// Adds one image's labels (values `>= k` ignored). An image without labelled pixels is
    /// not counted.
    pub fn add_image(&mut self, labels: &[u8]) {
        let mut counts = vec![0u64; self.k];
        for &l in labels {
            if (l as usize) < self.k {
                counts[l as usize] += 1;
            }
        }
        let n: u64 = counts.iter().sum();
        if n == 0 {
            return;
        }
        self.images += 1;
        for (c, &cnt) in counts.iter().enumerate() {
            self.share_sum[c] += cnt as f64 / n as f64;
            self.pixels[c] += cnt;
            if cnt > 0 {
                self.present[c] += 1;
            }
        }
    }

    /// Adds another accumulator's images (parallel reduction).
    pub fn merge(&mut self, other: &ClassStatsAccumulator) {
        assert_eq!(self.k, other.k);
        self.images += other.images;
        for c in 0..self.k {
            self.share_sum[c] += other.share_sum[c];
            self.present[c] += other.present[c];
            self.pixels[c] += other.pixels[c];
        }
    }

    pub fn finish(&self) -> ClassStats {
        let imgs = self.images.max(1) as f64;
        let total: u64 = self.pixels.iter().sum();
        ClassStats {
            images: self.images,
            avg_pixel_share: self.share_sum.iter().map(|s| s / imgs).collect(),
            total_pixel_share: self
                .pixels
                .iter()
                .map(|&p| p as f64 / total.max(1) as f64)
                .collect(),
            image_share: self.present.iter().map(|&p| p as f64 / imgs).collect(),
        }
    }
}

/// Per-class statistics of a label set (fractions in 0..1, not percent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// Images with at least one labelled pixel.
    pub images: u64,
    /// Mean over images of the class's share of the image's labelled pixels.
    pub avg_pixel_share: Vec<f64>,
    /// The class's share of all labelled pixels.
    pub total_pixel_share: Vec<f64>,
    /// Share of images in which the class appears.
    pub image_share: Vec<f64>,
}

impl ClassStats {
    pub fn from_labels<'a>(k: usize, maps: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut acc = ClassStatsAccumulator::new(k);
        for m in maps {
            acc.add_image(m);
        }
        acc.finish()
    }
}

/// The paper's class groups (class ids, ascending).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassGroups {
    pub small: Vec<usize>,
    pub large: Vec<usize>,
    pub rare: Vec<usize>,
    pub common: Vec<usize>,
}

impl ClassGroups {
    /// Groups by the paper's thresholds ([`SMALL_SHARE`], [`RARE_SHARE`]).
    pub fn from_stats(s: &ClassStats) -> Self {
        Self::with_thresholds(s, SMALL_SHARE, RARE_SHARE)
    }

    /// Small: `avg_pixel_share < small`; rare: `image_share < rare`.
    pub fn with_thresholds(s: &ClassStats, small: f64, rare: f64) -> Self {
        let k = s.avg_pixel_share.len();
        let (sm, lg): (Vec<usize>, Vec<usize>) =
            (0..k).partition(|&c| s.avg_pixel_share[c] < small);
        let (ra, co): (Vec<usize>, Vec<usize>) = (0..k).partition(|&c| s.image_share[c] < rare);
        ClassGroups {
            small: sm,
            large: lg,
            rare: ra,
            common: co,
        }
    }

    /// (name, members) in the order of the paper's Table 3.
    pub fn named(&self) -> [(&'static str, &[usize]); 4] {
        [
            ("small", &self.small),
            ("large", &self.large),
            ("rare", &self.rare),
            ("common", &self.common),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_picture_shades_rows_by_recall_and_shows_class_colours() {
        let mut c = Confusion::new(2);
        // Class 0: 3 pixels right, 1 taken for class 1; class 1: all 4 right.
        c.add(&[0, 0, 0, 0, 1, 1, 1, 1], &[0, 0, 0, 1, 1, 1, 1, 1]);
        let (w, h, rgb) = c.picture(4, &[[200, 0, 0], [0, 200, 0]]);
        assert_eq!((w, h, rgb.len()), (12, 12, 12 * 12 * 3));
        let px = |x: usize, y: usize| {
            [
                rgb[(y * w + x) * 3],
                rgb[(y * w + x) * 3 + 1],
                rgb[(y * w + x) * 3 + 2],
            ]
        };
        // Cell (row g, column p) covers x in [(p + 1) 4, (p + 2) 4), y likewise with g.
        assert_eq!(px(4, 4), [70, 100, 144], "class 0 -> 0: 3/4 of the shade");
        assert_eq!(px(11, 7), [193, 203, 218], "class 0 -> 1: 1/4");
        assert_eq!(px(5, 9), [255, 255, 255], "class 1 -> 0: never");
        assert_eq!(px(8, 8), [8, 48, 107], "class 1 -> 1: always");
        assert_eq!(px(0, 5), [200, 0, 0], "row strip: class 0's colour");
        assert_eq!(px(3, 11), [0, 200, 0], "row strip: class 1's colour");
        assert_eq!(px(9, 1), [0, 200, 0], "column strip: class 1's colour");
        assert_eq!(px(1, 1), [255, 255, 255]);
    }

    #[test]
    fn confusion_counts_and_ignores() {
        let mut c = Confusion::new(3);
        c.add(&[0, 0, 1, 2, 3, 255], &[0, 1, 1, 0, 2, 2]);
        assert_eq!(c.total(), 4);
        assert_eq!(c.get(0, 0), 1);
        assert_eq!(c.get(0, 1), 1);
        assert_eq!(c.get(1, 1), 1);
        assert_eq!(c.get(2, 0), 1);
        // IoU: c0 tp1 / (gt2 + pred2 - 1) = 1/3; c1 1/(1+2-1) = 1/2; c2 0/(1+0) = 0.
        let iou = c.iou();
        assert!((iou[0].unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((iou[1].unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(iou[2], Some(0.0));
        assert!((c.pixel_acc() - 0.5).abs() < 1e-12);
        assert!((c.miou() - (1.0 / 3.0 + 0.5) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn absent_classes_have_no_iou() {
        let mut c = Confusion::new(4);
        c.add(&[0, 1], &[0, 1]);
        assert_eq!(c.iou(), vec![Some(1.0), Some(1.0), None, None]);
        assert_eq!(c.miou(), 1.0);
        assert_eq!(group_miou(&c.iou(), &[2, 3]), None);
        assert_eq!(group_miou(&c.iou(), &[1, 3]), Some(1.0));
        let mut d = Confusion::new(4);
        d.add(&[0], &[3]);
        c.merge(&d);
        // Class 3 predicted, never true: IoU 0 and counted; class 0 now 1/2.
        assert_eq!(c.iou(), vec![Some(0.5), Some(1.0), None, Some(0.0)]);
        assert_eq!(c.class_acc(), vec![Some(0.5), Some(1.0), None, None]);
    }

    #[test]
    fn stats_and_groups_follow_the_paper_definitions() {
        // Image A: 3 labelled pixels of class 0, 1 of class 1 (+ ignored).
        // Image B: 4 pixels of class 0. Image C: only ignored (skipped).
        let a = [0u8, 0, 0, 1, 9];
        let b = [0u8, 0, 0, 0];
        let c = [9u8, 9];
        let s = ClassStats::from_labels(3, [&a[..], &b[..], &c[..]]);
        assert_eq!(s.images, 2);
        assert_eq!(s.avg_pixel_share, vec![(0.75 + 1.0) / 2.0, 0.125, 0.0]);
        assert_eq!(s.total_pixel_share, vec![7.0 / 8.0, 1.0 / 8.0, 0.0]);
        assert_eq!(s.image_share, vec![1.0, 0.5, 0.0]);
        let g = ClassGroups::with_thresholds(&s, 0.2, 0.6);
        assert_eq!(g.small, vec![1, 2]);
        assert_eq!(g.large, vec![0]);
        assert_eq!(g.rare, vec![1, 2]);
        assert_eq!(g.common, vec![0]);
        let g = ClassGroups::from_stats(&s);
        assert_eq!(g.small, vec![2]);
        assert_eq!(g.rare, vec![2]);
    }
}
