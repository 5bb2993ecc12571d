//! The lists of the ANN index ([`super::IvfIndex`]): each item's residual from its list's base
//! vector in 4 bits, stored in blocks of 16 items for the byte multiply-adds, the query in 8
//! bits, and the kernels that score a block (AVX2, and a portable loop that computes the same
//! integers). The layout is described in the parent module's docs.

/// Item index (the catalogue's `ItemIdx`).
pub type Item = u32;

/// Dot product in eight lanes, so that it vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Items per block of a list's 4-bit copy.
const BLOCK: usize = 16;
/// Dimensions of an item stored side by side in a block: one 32-bit lane of the byte
/// multiply-add, which sums four products.
const GROUP: usize = 4;
/// Dimensions per byte plane of a block: two groups, one in each half of a byte.
const PAIR: usize = 2 * GROUP;
/// A residual's codes are `-RESIDUAL_MAX..=RESIDUAL_MAX`, stored plus `CODE_OFFSET` (1 to 15,
/// unsigned, as the byte multiply-add reads its first operand).
const RESIDUAL_MAX: i8 = 7;
const CODE_OFFSET: i32 = 8;

/// Codes per item: `hidden` rounded up to a whole pair of groups.
pub(super) fn code_width(hidden: usize) -> usize {
    hidden.div_ceil(PAIR) * PAIR
}

/// One list: its items' vectors as 4-bit residuals from the list's base vector, in blocks (see
/// the module docs). The last block may be partly filled; its empty slots have item
/// `Item::MAX`, scale 0 and bias -inf.
#[derive(Default, Clone)]
pub(super) struct List {
    /// `[hidden]` the vector the residuals are taken from: the centroid's vector part.
    base: Vec<f32>,
    /// `[blocks * BLOCK]` items.
    items: Vec<Item>,
    /// `[blocks, width / PAIR, BLOCK, GROUP]` bytes (`width`: `hidden` rounded up to a whole
    /// pair of groups, the padding zero), each holding two codes plus `CODE_OFFSET`: block
    /// `b`'s dimension `d` of its `j`-th item is in byte
    /// `((b * width / PAIR + d / PAIR) * BLOCK + j) * GROUP + d % GROUP`, in its low half if
    /// `d % PAIR < GROUP`, else in its high half; the vector is `base + scale * code`.
    codes: Vec<u8>,
    /// `[blocks * BLOCK]` per-item scale of the codes.
    scales: Vec<f32>,
    /// `[blocks * BLOCK]` per-item bias.
    bias: Vec<f32>,
    /// Items held (the slots in use).
    len: usize,
}

impl List {
    pub(super) fn with_capacity(items: usize, base: &[f32]) -> Self {
        let slots = items.div_ceil(BLOCK) * BLOCK;
        List {
            base: base.to_vec(),
            items: Vec::with_capacity(slots),
            codes: Vec::with_capacity(slots * code_width(base.len()) / 2),
            scales: Vec::with_capacity(slots),
            bias: Vec::with_capacity(slots),
            len: 0,
        }
    }

    /// Appends an item, its residual from the base quantised to 4 bits with a scale of its own.
    pub(super) fn push(&mut self, item: Item, vector: &[f32], bias: f32) {
        let hidden = self.base.len();
        let bytes = code_width(hidden) * BLOCK / 2;
        let zero = (CODE_OFFSET | CODE_OFFSET << 4) as u8;
        if self.len == self.items.len() {
            // A new block, its slots empty until filled.
            self.items.resize(self.len + BLOCK, Item::MAX);
            self.codes.resize((self.len / BLOCK + 1) * bytes, zero);
            self.scales.resize(self.len + BLOCK, 0.0);
            self.bias.resize(self.len + BLOCK, f32::NEG_INFINITY);
        }
        let (block, j) = (self.len / BLOCK, self.len % BLOCK);
        let residual: Vec<f32> = vector[..hidden].iter().zip(&self.base).map(|(v, b)| v - b).collect();
        let (codes, scale) = quantise_residual(&residual);
        let block = &mut self.codes[block * bytes..(block + 1) * bytes];
        for (d, code) in codes.into_iter().enumerate() {
            let byte = &mut block[((d / PAIR) * BLOCK + j) * GROUP + d % GROUP];
            let code = (i32::from(code) + CODE_OFFSET) as u8;
            *byte = if d % PAIR < GROUP { (*byte & 0xF0) | code } else { (*byte & 0x0F) | code << 4 };
        }
        self.items[self.len] = item;
        self.scales[self.len] = scale;
        self.bias[self.len] = bias;
        self.len += 1;
    }

    pub(super) fn bytes(&self) -> usize {
        self.base.capacity() * 4
            + self.items.capacity() * 4
            + self.codes.capacity()
            + self.scales.capacity() * 4
            + self.bias.capacity() * 4
    }
}

/// `values` in 8 bits: codes in `-127..=127` (never -128, so that a code's negation is a
/// code) and the scale that gives them back (`value ~ scale * code`; 0 for a zero vector).
fn quantise(values: &[f32]) -> (Vec<i8>, f32) {
    quantise_within(values, 127)
}

/// A residual in 4 bits: codes in `-RESIDUAL_MAX..=RESIDUAL_MAX` and their scale.
fn quantise_residual(values: &[f32]) -> (Vec<i8>, f32) {
    quantise_within(values, RESIDUAL_MAX)
}

/// `values` as codes in `-top..=top` with one scale, the largest magnitude mapped to `top`.
fn quantise_within(values: &[f32], top: i8) -> (Vec<i8>, f32) {
    let largest = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let top = f32::from(top);
    let scale = if largest > 0.0 && largest.is_finite() { largest / top } else { 0.0 };
    let codes =
        values.iter().map(|&v| if scale > 0.0 { (v / scale).round().clamp(-top, top) as i8 } else { 0 }).collect();
    (codes, scale)
}

/// A query in 8 bits, as the scan reads it: each group of four codes packed in one `i32`
/// (the byte multiply-add's signed side), and the codes' sum, which takes the items' code
/// offset back out.
pub(super) struct Quantised {
    /// `[width / GROUP]` codes, four to a lane, little-endian.
    signed: Vec<i32>,
    /// `CODE_OFFSET` times the sum of the codes.
    offset: i32,
    scale: f32,
    /// The query's own floats, for its exact product with a list's base.
    values: Vec<f32>,
}

impl Quantised {
    pub(super) fn new(query: &[f32], hidden: usize) -> Self {
        let (mut codes, scale) = quantise(&query[..hidden]);
        codes.resize(code_width(hidden), 0);
        let signed = codes
            .chunks_exact(GROUP)
            .map(|g| i32::from_le_bytes([g[0] as u8, g[1] as u8, g[2] as u8, g[3] as u8]))
            .collect();
        let offset = CODE_OFFSET * codes.iter().map(|&c| i32::from(c)).sum::<i32>();
        Quantised { signed, offset, scale, values: query[..hidden].to_vec() }
    }
}

/// The integer dot products of one block's 16 items (`BLOCK * width / 2` bytes, the codes
/// with their offset) with `Q` queries: the portable kernel, and the reference the AVX2 one
/// must match exactly. The caller takes each query's `offset` back out.
#[inline(always)]
fn block_dots_portable<const Q: usize>(block: &[u8], queries: &[&Quantised; Q]) -> [[i32; BLOCK]; Q] {
    let mut dots = [[0i32; BLOCK]; Q];
    for (p, plane) in block.chunks_exact(BLOCK * GROUP).enumerate() {
        for (out, q) in dots.iter_mut().zip(queries) {
            let low = q.signed[2 * p].to_le_bytes().map(|b| i32::from(b as i8));
            let high = q.signed[2 * p + 1].to_le_bytes().map(|b| i32::from(b as i8));
            for (o, codes) in out.iter_mut().zip(plane.chunks_exact(GROUP)) {
                *o += (0..GROUP)
                    .map(|t| low[t] * i32::from(codes[t] & 0x0F) + high[t] * i32::from(codes[t] >> 4))
                    .sum::<i32>();
            }
        }
    }
    dots
}

/// [`block_dots_portable`] with AVX2: per pair of groups (eight dimensions), two loads of 32
/// bytes (the 16 items), each split into its low and high halves, products with the query's
/// codes summed in pairs (`maddubs`: unsigned codes of at most 15 against signed ones of at most
/// 127, so no saturation), the two halves added, and summed in fours (`madd`) into each item's
/// 32-bit sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn block_dots_avx2<const Q: usize>(block: &[u8], queries: &[&Quantised; Q]) -> [[i32; BLOCK]; Q] {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi16, _mm256_add_epi32, _mm256_and_si256, _mm256_loadu_si256, _mm256_madd_epi16,
        _mm256_maddubs_epi16, _mm256_set1_epi16, _mm256_set1_epi32, _mm256_set1_epi8, _mm256_setzero_si256,
        _mm256_srli_epi16, _mm256_storeu_si256,
    };
    let ones = _mm256_set1_epi16(1);
    let nibble = _mm256_set1_epi8(0x0F);
    let mut low = [_mm256_setzero_si256(); Q];
    let mut high = [_mm256_setzero_si256(); Q];
    for (p, plane) in block.chunks_exact(BLOCK * GROUP).enumerate() {
        let plane: &[u8; BLOCK * GROUP] = plane.try_into().expect("chunks_exact gives whole planes");
        // SAFETY: two unaligned 32-byte loads inside the 64-byte `plane`.
        let (a, b) = unsafe {
            let at = plane.as_ptr().cast::<__m256i>();
            (_mm256_loadu_si256(at), _mm256_loadu_si256(at.add(1)))
        };
        let halves = |x| (_mm256_and_si256(x, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(x), nibble));
        let ((a_low, a_high), (b_low, b_high)) = (halves(a), halves(b));
        for qi in 0..Q {
            let q_low = _mm256_set1_epi32(queries[qi].signed[2 * p]);
            let q_high = _mm256_set1_epi32(queries[qi].signed[2 * p + 1]);
            let eight = |l, h| {
                let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(l, q_low), _mm256_maddubs_epi16(h, q_high));
                _mm256_madd_epi16(pairs, ones)
            };
            low[qi] = _mm256_add_epi32(low[qi], eight(a_low, a_high));
            high[qi] = _mm256_add_epi32(high[qi], eight(b_low, b_high));
        }
    }
    let mut dots = [[0i32; BLOCK]; Q];
    for (out, (l, h)) in dots.iter_mut().zip(low.iter().zip(&high)) {
        let (first, second) = out.split_at_mut(BLOCK / 2);
        // SAFETY: each half of `out` holds eight i32s, the 32 bytes stored.
        unsafe {
            _mm256_storeu_si256(first.as_mut_ptr().cast(), *l);
            _mm256_storeu_si256(second.as_mut_ptr().cast(), *h);
        }
    }
    dots
}

/// Scores every item of `list` against `Q` queries and hands each `(query, item, score)`
/// whose score beats the query's floor to `visit`, which answers the query's new floor. A
/// block none of whose scores beats the floor costs no call (most blocks, once a query has its
/// `k` candidates). `AVX2` picks that kernel (only where the CPU has it: see [`scan`]).
#[inline(always)]
fn scan_list<const Q: usize, const AVX2: bool>(
    list: &List,
    width: usize,
    queries: [&Quantised; Q],
    floors: &mut [f32; Q],
    visit: &mut impl FnMut(usize, Item, f32) -> f32,
) {
    let (scales, _) = list.scales.as_chunks::<BLOCK>();
    let (bias, _) = list.bias.as_chunks::<BLOCK>();
    let (items, _) = list.items.as_chunks::<BLOCK>();
    // An item's score: the query's product with the list's base, plus its product with the
    // item's residual, plus the item's bias.
    let base: [f32; Q] = std::array::from_fn(|qi| dot(&queries[qi].values, &list.base));
    for (((block, scales), bias), items) in list.codes.chunks_exact(width * BLOCK / 2).zip(scales).zip(bias).zip(items)
    {
        #[cfg(target_arch = "x86_64")]
        let dots = if AVX2 {
            // SAFETY: `AVX2` is only set by `scan_list_avx2`, which runs once the CPU was
            // found to have the feature.
            unsafe { block_dots_avx2::<Q>(block, &queries) }
        } else {
            block_dots_portable::<Q>(block, &queries)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let dots = block_dots_portable::<Q>(block, &queries);
        for (qi, dots) in dots.iter().enumerate() {
            // Empty slots have scale 0 and bias -inf: they never beat a floor.
            let Quantised { scale, offset, .. } = *queries[qi];
            let mut scores = [0f32; BLOCK];
            let mut any = false;
            for j in 0..BLOCK {
                scores[j] = (dots[j] - offset) as f32 * (scale * scales[j]) + (base[qi] + bias[j]);
                any |= scores[j] > floors[qi];
            }
            if any {
                for j in 0..BLOCK {
                    if scores[j] > floors[qi] {
                        floors[qi] = visit(qi, items[j], scores[j]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scan_list_avx2<const Q: usize>(
    list: &List,
    width: usize,
    queries: [&Quantised; Q],
    floors: &mut [f32; Q],
    visit: &mut impl FnMut(usize, Item, f32) -> f32,
) {
    scan_list::<Q, true>(list, width, queries, floors, visit)
}

/// [`scan_list`] with the best kernel the CPU runs.
pub(super) fn scan<const Q: usize>(
    list: &List,
    width: usize,
    queries: [&Quantised; Q],
    floors: &mut [f32; Q],
    visit: &mut impl FnMut(usize, Item, f32) -> f32,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for (checked just above).
        return unsafe { scan_list_avx2::<Q>(list, width, queries, floors, visit) };
    }
    scan_list::<Q, false>(list, width, queries, floors, visit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_kernels_compute_the_exact_integer_dot_products_of_the_codes() {
        // 13 dimensions: the last pair of groups is padded. Residual codes at both ends of
        // their range against query codes at both ends of theirs, where a byte multiply-add
        // would saturate if the sums were taken wrongly.
        let h = 13;
        let mut rng = SmallRng::seed_from_u64(5);
        let base: Vec<f32> = (0..h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut list = List::with_capacity(BLOCK, &base);
        let mut residuals = Vec::new();
        for j in 0..BLOCK {
            let r: Vec<f32> = (0..h)
                .map(|d| {
                    if j == 0 {
                        if d % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                    } else {
                        rng.random_range(-2.0..2.0)
                    }
                })
                .collect();
            let v: Vec<f32> = r.iter().zip(&base).map(|(r, b)| r + b).collect();
            list.push(j as Item, &v, 0.0);
            // What the list quantises: its own subtraction (`v - base`, not `r` to the bit).
            residuals.push(v.iter().zip(&base).map(|(v, b)| v - b).collect::<Vec<f32>>());
        }
        let queries: Vec<Vec<f32>> = vec![
            vec![1.0; h],
            (0..h).map(|d| if d % 2 == 0 { 3.0 } else { -3.0 }).collect(),
            (0..h).map(|_| rng.random_range(-1.0..1.0)).collect(),
        ];
        let quantised: Vec<Quantised> = queries.iter().map(|q| Quantised::new(q, h)).collect();
        let refs: [&Quantised; 3] = [&quantised[0], &quantised[1], &quantised[2]];
        let bytes = code_width(h) * BLOCK / 2;
        let portable = block_dots_portable::<3>(&list.codes[..bytes], &refs);
        for (qi, q) in queries.iter().enumerate() {
            let (qc, _) = quantise(q);
            for (j, r) in residuals.iter().enumerate() {
                let (rc, _) = quantise_residual(r);
                let want: i32 = qc.iter().zip(&rc).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
                assert_eq!(portable[qi][j] - quantised[qi].offset, want, "query {qi}, item {j}");
            }
        }
        assert_eq!(portable[1][0] - quantised[1].offset, 127 * 7 * h as i32, "the extremes add up without saturating");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            let avx2 = unsafe { block_dots_avx2::<3>(&list.codes[..bytes], &refs) };
            assert_eq!(avx2, portable);
        }
    }
}
