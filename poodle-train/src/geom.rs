//! Geometry conventions shared by augmentation and loss (see also `poodle_common::flowmath`).
//!
//! An [`Affine`] is one 2x3 matrix in pixel coordinates (pixel centres at integers) that maps
//! an *output* pixel to the *input* position it samples: an augmented view is
//! `view(x) = image(A x)`. So the view's pixel `x` shows image content at `A x`, and image
//! pixel `y` appears in the view at `A^-1 y`. A horizontal flip is an affine too, so a branch's
//! flip is folded into its matrix. `valid(x)` is true where `A x` lies inside the input
//! (`[0, W-1] x [0, H-1]`).

/// Row-major [[a, b, c], [d, e, f]]: x_in = a x + b y + c, y_in = d x + e y + f.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine(pub [f64; 6]);

impl Affine {
    pub const IDENTITY: Affine = Affine([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);

    pub fn apply(&self, x: f64, y: f64) -> (f64, f64) {
        let m = &self.0;
        (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5])
    }

    pub fn inverse(&self) -> Affine {
        let [a, b, c, d, e, f] = self.0;
        let det = a * e - b * d;
        assert!(det.abs() > 1e-12, "singular affine {self:?}");
        let (ia, ib, id, ie) = (e / det, -b / det, -d / det, a / det);
        Affine([ia, ib, -(ia * c + ib * f), id, ie, -(id * c + ie * f)])
    }

    /// `self` after `other`: (self ∘ other)(x) = self(other(x)).
    pub fn compose(&self, other: &Affine) -> Affine {
        let [a, b, c, d, e, f] = self.0;
        let [p, q, r, s, t, u] = other.0;
        Affine([
            a * p + b * s,
            a * q + b * t,
            a * r + b * u + c,
            d * p + e * s,
            d * q + e * t,
            d * r + e * u + f,
        ])
    }

    /// Rotation by `deg` degrees and isotropic scale `scale` about the centre of a `w` x `h`
    /// image, optionally mirrored horizontally, as a sampling map (output -> input).
    pub fn about_centre(w: usize, h: usize, deg: f64, scale: f64, flip: bool) -> Affine {
        let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
        let (s, c) = deg.to_radians().sin_cos();
        // Sampling map: input = centre + R(-deg) / scale * (F(output) - centre).
        let fx = if flip { -1.0 } else { 1.0 };
        let (a, b, d, e) = (c * fx / scale, s / scale, -s * fx / scale, c / scale);
        Affine([a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_and_compose_round_trip() {
        let a = Affine::about_centre(64, 32, 7.0, 1.08, true);
        let id = a.compose(&a.inverse());
        for (x, y) in id.0.iter().zip(Affine::IDENTITY.0.iter()) {
            assert!((x - y).abs() < 1e-12);
        }
        let (x, y) = a.apply(3.0, 4.0);
        let (bx, by) = a.inverse().apply(x, y);
        assert!((bx - 3.0).abs() < 1e-12 && (by - 4.0).abs() < 1e-12);
    }

    #[test]
    fn flip_and_centre_are_fixed_points_as_expected() {
        let f = Affine::about_centre(10, 6, 0.0, 1.0, true);
        assert_eq!(f.apply(0.0, 2.0), (9.0, 2.0));
        let r = Affine::about_centre(11, 7, 30.0, 0.9, false);
        let (x, y) = r.apply(5.0, 3.0);
        assert!(
            (x - 5.0).abs() < 1e-12 && (y - 3.0).abs() < 1e-12,
            "centre stays"
        );
        // 90 degrees about the centre of a square: output (cx+1, cy) samples input (cx, cy-1)
        // or (cx, cy+1) depending on orientation; scale 1 keeps distances.
        let q = Affine::about_centre(9, 9, 90.0, 1.0, false);
        let (x, y) = q.apply(5.0, 4.0);
        assert!(((x - 4.0).powi(2) + (y - 4.0).powi(2) - 1.0).abs() < 1e-9);
    }
}
