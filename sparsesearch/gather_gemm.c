/* Shape-wise conv as one fused gather-GEMM: the reduced im2col is never built.

   y[q, o] = bias[o] + sum_k w[k, o] * x[base(q) + start[k]]

   for every output pixel q (over the whole batch) and output channel o, where x is the input padded
   into a buffer (channels-last, or in planes), base(q) the offset of q's window in it and start[k]
   the offset of kept GEMM column k in a window. The microkernel is the usual register-blocked GEMM tile (MR
   pixels by NR output channels of accumulators, a weight panel row loaded as vectors, one input
   element broadcast per pixel), except that each pixel's inputs are read where they lie instead of
   from a packed copy: the packing that a BLAS does anyway is the gather, so it costs nothing more.
   Built by sparsesearch/native.py with the machine's own vector width (-march=native). */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16 /* floats per vector */
#define MR 14 /* pixels per tile: 28 accumulators of the 32 vector registers */
#else
#define VW 8
#define MR 6 /* 12 accumulators of 16 registers */
#endif
#define NR (2 * VW) /* output channels per tile, and per weight panel */
#ifndef BLOCK
#define BLOCK 8 /* tiles that share a weight panel while it is in L1 */
#endif

typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));

int ss_panel_width(void) { return NR; }
int ss_tile_pixels(void) { return MR; }

/* One tile: mr pixels (their window starts in `at`) by nv vectors of output channels of a panel, nr of
   them real. Full panels take MR pixels by two vectors; a panel of at most one vector's channels (a
   layer's last, or its only, as in a 16-channel layer) takes twice the pixels by one vector, so that no
   accumulator computes zeros. */
static inline __attribute__((always_inline)) void tile(
    int mr, int nv, const float *const *at, const int *start, long k_count, const float *panel, const float *bias,
    float *y, long ypix, long ych, int nr)
{
    vf acc[2 * MR][2], b[2] = {{0}, {0}};
    for (int v = 0; v < nv; v++)
        if (bias)
            memcpy(&b[v], bias + v * VW, sizeof(vf));
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) {
            acc[i][v] = b[v];
            if (ych == 1) /* channels-last: the line this accumulator ends in, fetched while the tile computes */
                __builtin_prefetch(y + i * ypix + v * VW, 1, 3);
        }
    for (long k = 0; k < k_count; k++) {
        vf w[2];
        for (int v = 0; v < nv; v++)
            memcpy(&w[v], panel + k * NR + v * VW, sizeof(vf));
        long s = start[k];
        for (int i = 0; i < mr; i++) {
            float a = at[i][s];
            for (int v = 0; v < nv; v++)
                acc[i][v] += w[v] * a;
        }
    }
    if (ych == 1 && nr == nv * VW) {
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < nv; v++)
                memcpy(y + i * ypix + v * VW, &acc[i][v], sizeof(vf));
        return;
    }
    float out[2 * MR * NR]; /* through memory: a register array indexed by a variable would stay in memory */
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++)
            memcpy(out + i * NR + v * VW, &acc[i][v], sizeof(vf));
    if (ypix == 1) /* NCHW: a channel's pixels are adjacent in y, so store them in a row */
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < mr; i++)
                y[j * ych + i] = out[i * NR + j];
    else
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                y[i * ypix + j * ych] = out[i * NR + j];
}

#define TILE(m, v) case m: tile(m, v, at, start, k_count, panel, bias, y, ypix, ych, nr); break;

/* the tile with mr and nv constants, so that its accumulators live in registers */
static void any_tile(int mr, int nv, const float *const *at, const int *start, long k_count, const float *panel,
                     const float *bias, float *y, long ypix, long ych, int nr)
{
    if (nv == 2)
        switch (mr) {
            TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2)
#if MR > 6
            TILE(7, 2) TILE(8, 2) TILE(9, 2) TILE(10, 2) TILE(11, 2) TILE(12, 2) TILE(13, 2) TILE(14, 2)
#endif
        }
    else
        switch (mr) {
            TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(5, 1) TILE(6, 1) TILE(7, 1) TILE(8, 1) TILE(9, 1)
            TILE(10, 1) TILE(11, 1) TILE(12, 1)
#if MR > 6
            TILE(13, 1) TILE(14, 1) TILE(15, 1) TILE(16, 1) TILE(17, 1) TILE(18, 1) TILE(19, 1) TILE(20, 1)
            TILE(21, 1) TILE(22, 1) TILE(23, 1) TILE(24, 1) TILE(25, 1) TILE(26, 1) TILE(27, 1) TILE(28, 1)
#endif
        }
}

/* Pad x (n samples of c x h x w, any element strides) into buf, n samples of c x hp x wp in x's layout:
   channels-last (`run` = c channels per pixel, one plane) or not (c planes of one float per pixel), zero
   where the conv pads. */
static void pad(const float *x, long n, long c, long h, long w, const long *strides, long top, long left,
                long hp, long wp, int channels_last, float *buf)
{
    long sn = strides[0], sc = strides[1], sh = strides[2], sw = strides[3];
    long planes = channels_last ? 1 : c, run = channels_last ? c : 1;
    int contiguous = channels_last ? sc == 1 && sw == c : sw == 1;
    for (long s = 0; s < n; s++)
        for (long pl = 0; pl < planes; pl++) {
            float *plane = buf + (s * planes + pl) * hp * wp * run;
            memset(plane, 0, (size_t)(top * wp * run) * sizeof(float));
            memset(plane + (top + h) * wp * run, 0, (size_t)((hp - top - h) * wp * run) * sizeof(float));
            for (long r = 0; r < h; r++) {
                float *row = plane + (top + r) * wp * run;
                const float *in = x + s * sn + pl * sc + r * sh;
                memset(row, 0, (size_t)(left * run) * sizeof(float));
                memset(row + (left + w) * run, 0, (size_t)((wp - left - w) * run) * sizeof(float));
                if (contiguous)
                    memcpy(row + left * run, in, (size_t)(w * run) * sizeof(float));
                else
                    for (long q = 0; q < w; q++)
                        for (long ch = 0; ch < run; ch++)
                            row[(left + q) * run + ch] = in[q * sw + ch * sc];
            }
        }
}

/* The pixels [first, end) of the batch, their samples padded in buf from sample `base` on. */
static void run(long first, long end, long base, const float *buf, const long *geometry, long c, const int *start,
                long k_count, const float *panels, const float *bias, long o_count, float *packed, float *y, long ys,
                long ypix, long ych)
{
    long hp = geometry[2], wp = geometry[3], sh = geometry[4], sw = geometry[5], oh = geometry[6], ow = geometry[7];
    long pixel = geometry[8] ? c : 1; /* floats between adjacent pixels of the padded buffer */
    long plane = oh * ow, n_panels = (o_count + NR - 1) / NR;
    long span = ys == plane * ypix ? end : plane; /* a tile runs across samples where the output does */
    int *packed_starts = (int *)packed; /* packed: k_count offsets, then each tile's columns, k-major */
    float *tiles_packed = packed ? packed + k_count : NULL;
    if (packed)
        for (long k = 0; k < k_count; k++)
            packed_starts[k] = (int)(k * MR);
    for (long b0 = first; b0 < end;) { /* a block of up to BLOCK * MR pixels; each panel runs over all of them */
        const float *at[BLOCK * MR];
        long count = 0; /* pixels in the block */
        for (int t = 0; t < BLOCK && b0 + count < end; t++) {
            long q0 = b0 + count, stop = (q0 / span + 1) * span;
            stop = stop < end ? stop : end;
            int mr = (int)(stop - q0 < MR ? stop - q0 : MR);
            const float **tile_at = at + count;
            for (int i = 0; i < mr; i++) {
                long q = q0 + i, s = q / plane, r = q % plane;
                tile_at[i] = buf + (s - base) * hp * wp * c + ((r / ow) * sh * wp + (r % ow) * sw) * pixel;
            }
            if (packed) {
                float *a = tiles_packed + t * k_count * MR;
                for (long k = 0; k < k_count; k++)
                    for (int i = 0; i < mr; i++)
                        a[k * MR + i] = tile_at[i][start[k]];
                for (int i = 0; i < mr; i++)
                    tile_at[i] = a + i;
            }
            count += mr;
        }
        for (long p = 0; p < n_panels; p++) {
            int nr = (int)(o_count - p * NR < NR ? o_count - p * NR : NR), nv = nr > VW ? 2 : 1;
            for (long done = 0; done < count;) { /* runs of pixels within one span */
                long q0 = b0 + done, stop = (q0 / span + 1) * span, width = nv == 2 ? MR : 2 * MR;
                int mr = (int)(stop - q0 < width ? stop - q0 : width);
                mr = mr < count - done ? mr : (int)(count - done);
                any_tile(mr, nv, at + done, packed ? packed_starts : start, k_count, panels + p * k_count * NR,
                         bias ? bias + p * NR : NULL, y + (q0 / plane) * ys + (q0 % plane) * ypix + p * NR * ych,
                         ypix, ych, nr);
                done += mr;
            }
        }
        b0 += count;
    }
}

/* The conv: x as above; geometry = {top, left, hp, wp, stride_h, stride_w, out_h, out_w, channels_last
   (of the padded buffer)}; start: k_count window offsets of the kept columns in the padded buffer;
   panels: ceil(o_count / NR) panels of k_count x NR weights (zero past o_count); bias: as many panels'
   worth, or NULL; buf: n * hp * wp * c floats of scratch; packed: NULL, or ss_packed_size(k_count)
   floats in which each tile's columns are gathered once for all panels (worth it where tiles run
   across samples: planes of fewer pixels than a tile).
   Output pixel q of sample s at y + s * ys + q * ypix + channel * ych.

   Where planes have at least a tile's pixels, each sample is padded just before its pixels are
   computed, so that its copy is still in cache (AlexNet's conv2 at batch 8: a 2 MB padded batch, 3%
   faster so, ad hoc). An input that needs no padding and is laid out as the buffer would be is read
   in place: 1x1 convs at 50% (ResNet-50's bottleneck shapes, 1 thread, Intel Xeon) went from
   0.7-1.5x to 0.85-2.4x over the dense conv without the copy, channels-last 0.9-2.0x to 1.0-2.3x. */
static void shape_conv(const float *x, long n, long c, long h, long w, const long *strides, const long *geometry,
                       const int *start, long k_count, const float *panels, const float *bias, long o_count,
                       float *buf, float *packed, float *y, long ys, long ypix, long ych)
{
    long top = geometry[0], left = geometry[1], hp = geometry[2], wp = geometry[3];
    long plane = geometry[6] * geometry[7], chunk = plane >= MR ? 1 : n; /* samples padded at a time */
    long sn = strides[0], sc = strides[1], sh = strides[2], sw = strides[3];
    if (top == 0 && left == 0 && hp == h && wp == w && sn == h * w * c
        && (geometry[8] ? sc == 1 && sw == c && sh == w * c : sw == 1 && sh == w && sc == h * w)) {
        /* no padding, and x laid out as the buffer would be (a 1x1 conv, say): read in place, no copy */
        run(0, n * plane, 0, x, geometry, c, start, k_count, panels, bias, o_count, packed, y, ys, ypix, ych);
        return;
    }
    for (long s = 0; s < n; s += chunk) {
        pad(x + s * strides[0], chunk, c, h, w, strides, top, left, hp, wp, (int)geometry[8], buf);
        run(s * plane, (s + chunk) * plane, s, buf, geometry, c, start, k_count, panels, bias, o_count, packed, y,
            ys, ypix, ych);
    }
}

/* shape_conv with the arguments that do not change from call to call for one layer and input size in
   one array, packed once by the caller: {n, c, h, w, x's 4 strides, the 9 of geometry, start, k_count,
   panels, bias, o_count, ys, ypix, ych} (pointers as integers). Converting eighteen arguments on every
   call cost the Python caller about 8 us, a tenth of a 15x-pruned AlexNet conv at batch 1. */
void ss_shape_conv(const float *x, float *buf, float *packed, float *y, const long long *a)
{
    long strides[4] = {(long)a[4], (long)a[5], (long)a[6], (long)a[7]}, geometry[9];
    for (int i = 0; i < 9; i++)
        geometry[i] = (long)a[8 + i];
    shape_conv(x, (long)a[0], (long)a[1], (long)a[2], (long)a[3], strides, geometry, (const int *)(intptr_t)a[17],
               (long)a[18], (const float *)(intptr_t)a[19], (const float *)(intptr_t)a[20], (long)a[21], buf, packed,
               y, (long)a[22], (long)a[23], (long)a[24]);
}

/* floats of the packed block that ss_shape_conv needs for k_count kept columns */
long ss_packed_size(long k_count) { return (BLOCK * MR + 1) * k_count; }
