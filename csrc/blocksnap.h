/*
 * blocksnap C core: the whole C API.
 *
 * Pure C99 kernels for the snapshot hot path: XXH3-128 chunk ids (system
 * libxxhash), zero and hole detection, comparison against a parent chunk
 * map, hole punching. No Python here. Every function returns BS_OK (0) or a
 * negative BS_E* status; outputs go through caller-provided pointers.
 * blocksnap/_build.py reads the declarations between the CDEF markers and
 * hands them to cffi, so this file is the single source of the interface.
 */
#ifndef BLOCKSNAP_H
#define BLOCKSNAP_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
#define BS_ABI_VERSION 11

#define BS_OK 0
#define BS_EINVAL -1 /* an argument is out of range; nothing was written */
#define BS_EIO -2    /* a system call failed; *err_out holds errno */
#define BS_ESHORT -3 /* the file ended before the requested range: it shrank */

#define BS_ID_LEN 16

/* Per-chunk flags written by bs_scan. */
#define BS_CHUNK_HOLE 1    /* wholly inside a hole: never read, id is zero */
#define BS_CHUNK_ZERO 2    /* read and found all zero, id is zero */
#define BS_CHUNK_DATA 4    /* non-zero data, id is its XXH3-128 */
#define BS_CHUNK_CHANGED 8 /* id differs from the parent's id at this index */

/* Returns BS_ABI_VERSION as compiled; _native.py refuses a stale build. */
int bs_abi_version(void);

/*
 * bs_hash128: XXH3-128 (seed 0) of data[0:len) written to out[0:16) in the
 * canonical big-endian byte order (XXH128_canonicalFromHash), the same bytes
 * as Python's xxhash.xxh3_128_digest(). Always BS_OK.
 */
int bs_hash128(const uint8_t *data, size_t len, uint8_t *out);

/*
 * bs_hash64: XXH3-64 (seed 0) of data[0:len) written to out[0:8) in the
 * canonical big-endian byte order (XXH64_canonicalFromHash), the same bytes
 * as Python's xxhash.xxh3_64_digest(). The checksum of catalog values and
 * pack trailers (docs/FORMAT.md, "Integrity"). Always BS_OK.
 */
int bs_hash64(const uint8_t *data, size_t len, uint8_t *out);

/* bs_is_zero: 1 if data[0:len) is all zero bytes (len 0 counts as zero), else 0. */
int bs_is_zero(const uint8_t *data, size_t len);

/*
 * bs_scan: read file range [offset, offset+length) of fd in chunks of
 * chunk_size and classify each one. n = ceil(length / chunk_size) chunks;
 * the last one may be short (an unaligned tail).
 *   buf, buf_len   scratch for the data, buf_len >= length; on return, the
 *                  bytes of every DATA chunk i sit at buf + i*chunk_size.
 *   parent_ids     parent_n ids (16 bytes each) of the parent snapshot for the
 *                  same chunk indexes, or NULL/0 when there is no parent;
 *                  indexes past parent_n count as absent (all-zero id).
 *   ids_out        n*16 bytes: each chunk's id, all zero for HOLE and ZERO.
 *   flags_out      n bytes of BS_CHUNK_* flags.
 *   changed_out    n entries: indexes of the DATA chunks whose id differs
 *                  from the parent's, ascending; *n_changed gets their count.
 * Holes are found with SEEK_DATA/SEEK_HOLE and never read; where the file
 * system or device does not support them the whole range counts as data.
 * On error (BS_EIO with *err_out = errno, BS_ESHORT, BS_EINVAL) the outputs
 * are partly written and must be discarded.
 */
int bs_scan(int fd, uint64_t offset, uint64_t length, uint32_t chunk_size,
            uint8_t *buf, size_t buf_len,
            const uint8_t *parent_ids, uint32_t parent_n,
            uint8_t *ids_out, uint8_t *flags_out,
            uint32_t *changed_out, uint32_t *n_changed, int *err_out);

/*
 * bs_punch_hole: deallocate [offset, offset+length) of a regular file while
 * keeping its size (fallocate PUNCH_HOLE|KEEP_SIZE). Reads of the range then
 * return zeros. BS_EIO with *err_out = errno when the file system refuses
 * (EOPNOTSUPP); the file is unchanged then.
 */
int bs_punch_hole(int fd, uint64_t offset, uint64_t length, int *err_out);
/*
 * bs_pwrite_sparse: write data[0:len) at offset of fd, skipping every
 * block_size-aligned (relative to offset) block that is all zero, so a file
 * that was created sparse keeps holes there. block_size 0 writes everything.
 * BS_EIO with *err_out = errno on a failed write; the range is then partly
 * written.
 */
int bs_pwrite_sparse(int fd, const uint8_t *data, size_t len, uint64_t offset,
                     uint32_t block_size, int *err_out);
/*
 * bs_entropy_probe: an estimate of how compressible data[0:len) is, as the
 * Shannon entropy in millibits per byte (0..8000) of a byte histogram over a
 * sample: up to 32 pieces of 256 bytes spread evenly over the buffer (the
 * whole buffer when it is shorter than 8 KiB). Random or already compressed
 * data measures close to 8000; text around 4000-5500. Always BS_OK.
 */
int bs_entropy_probe(const uint8_t *data, size_t len, uint32_t *millibits_out);
/*
 * bs_ids_nonzero: the indexes of the ids in ids[0:n*16) that are not the
 * zero id, ascending, into idx_out (room for n); their count in *count.
 * Lets Python skip the zero chunks of a huge sparse map without a loop of its own.
 */
int bs_ids_nonzero(const uint8_t *ids, uint32_t n, uint32_t *idx_out, uint32_t *count);
/*
 * bs_ids_filter: which of a set of candidate ids occur in a list of ids.
 * cands[0:ncand*16) holds ncand ids sorted ascending in memcmp order (no
 * duplicates needed); for every id in ids[0:n*16) that equals a candidate,
 * found[k] is set to 1 for that candidate's index k (found has ncand bytes
 * and is not cleared first, so one found array can be fed many lists).
 * The zero id never matches. Returns BS_OK, or BS_EINVAL if cands is not
 * sorted (nothing is marked then). This is the mark of a mark-and-sweep:
 * before chunk data is removed, every live map segment is fed through it.
 */
int bs_ids_filter(const uint8_t *cands, uint32_t ncand, const uint8_t *ids, uint32_t n, uint8_t *found);

/* Chunk codecs, as stored in pack records. */
#define BS_CODEC_RAW 0
#define BS_CODEC_ZSTD 1
/* Record kinds (byte 5 of a record header): what the stored bytes are. */
#define BS_KIND_CHUNK 0   /* a chunk of an image; its id is the XXH3-128 of its raw bytes */
#define BS_KIND_SEGMENT 1 /* a chunk-map segment: chunk ids, 16 bytes each; its id is their XXH3-128 */
#define BS_EDATA -4 /* stored bytes do not decode to the expected length */
#define BS_ENOMEM -5

typedef struct bs_codec bs_codec;

/*
 * bs_codec_new: a compression and decompression context for one thread;
 * NULL when out of memory or when zstd refuses a parameter. level is the
 * zstd compression level; hash_log > 0 overrides that level's match-finder
 * hash table size (2^hash_log entries, ZSTD_c_hashLog), 0 keeps the
 * level's own. Only the encoder's speed and ratio depend on them: every
 * setting makes ordinary zstd frames.
 */
bs_codec *bs_codec_new(int level, int hash_log);
void bs_codec_free(bs_codec *codec);

/*
 * bs_encode_chunks: encode, in place, the chunks idx[0:n] of a window laid
 * out as bs_scan leaves it (chunk i at buf + i*chunk_size, the window
 * length bytes long). A chunk whose sampled entropy is at least
 * skip_millibits (bs_entropy_probe), or that zstd cannot shrink by 1/32, is
 * left as it is: codec_out[k] = BS_CODEC_RAW, len_out[k] = its length.
 * Otherwise its compressed form (a zstd frame without content size)
 * replaces the first len_out[k] bytes of its slot and codec_out[k] =
 * BS_CODEC_ZSTD. BS_ENOMEM or BS_EINVAL leave the window partly encoded.
 */
int bs_encode_chunks(bs_codec *codec, uint8_t *buf, uint64_t length, uint32_t chunk_size,
                     const uint32_t *idx, uint32_t n, uint32_t skip_millibits,
                     uint8_t *codec_out, uint32_t *len_out);

/*
 * bs_decode: the raw bytes of one stored chunk into dst (dst_len bytes,
 * the chunk's raw length). BS_EDATA when src does not decode to exactly
 * dst_len bytes (damage), BS_EINVAL for an unknown codec.
 */
int bs_decode(bs_codec *codec, int codec_id, const uint8_t *src, size_t src_len,
              uint8_t *dst, size_t dst_len);
/* One chunk to restore: where its record is, what it must hash to, where it goes. */
typedef struct {
    int pack_fd;          /* open pack file */
    uint64_t pack_offset; /* offset of the chunk's 32-byte record header */
    uint32_t stored_len;  /* bytes after the header */
    uint32_t raw_len;     /* the chunk's length in the image */
    uint8_t codec;        /* BS_CODEC_* */
    uint8_t kind;         /* BS_KIND_* the record header must name */
    uint8_t id[16];       /* the id its raw bytes must hash to */
    uint64_t out_offset;  /* where it goes in the output */
} bs_restore_item;

#define BS_EDAMAGED -6 /* a stored chunk is damaged; *detail_out says how */
#define BS_DAMAGE_SHORT 1  /* the pack ends inside the record */
#define BS_DAMAGE_HEADER 2 /* the record header (magic, codec, kind, lengths, id) does not match the index */
#define BS_DAMAGE_DECODE 3 /* the stored bytes do not decode to raw_len bytes */
#define BS_DAMAGE_HASH 4   /* the content does not hash to its id */
#define BS_DAMAGE_INDEX 5  /* the item's lengths do not fit the buffers (a damaged index entry) */

/*
 * bs_restore_chunks: for each item: read its record, check the header
 * against the item (magic, codec, kind, reserved bytes zero, lengths, id), decode, check the XXH3-128 against the id, and write
 * the bytes to out_fd at out_offset (skipping all-zero sparse_block blocks
 * when sparse_block > 0, see bs_pwrite_sparse). out_fd < 0 checks only:
 * that is how verify reads the repository. scratch holds 32 + one chunk,
 * raw one chunk: an item whose lengths do not fit them comes from a damaged
 * index entry (BS_DAMAGE_INDEX), since the lengths are read from the
 * catalog, which has no checksums of its own. Stops at the first
 * failure: *failed_out = its index, and BS_EIO (*detail_out = errno, from
 * a read or write) or BS_EDAMAGED (*detail_out = BS_DAMAGE_*). On success
 * *failed_out = n. Items before the failed one are written.
 */
int bs_restore_chunks(bs_codec *codec, const bs_restore_item *items, uint32_t n, int out_fd,
                      uint32_t sparse_block, uint8_t *scratch, size_t scratch_len,
                      uint8_t *raw, size_t raw_len, uint32_t *failed_out, int *detail_out);
/*
 * bs_restore_to_memory: bs_restore_chunks into memory: each item's checked raw bytes are copied to
 * dst + out_offset (an item that does not fit dst[0:dst_len) is BS_DAMAGE_INDEX). For sinks that lay
 * the guest data out themselves (qcow2). Same checks, same failure reporting.
 */
int bs_restore_to_memory(bs_codec *codec, const bs_restore_item *items, uint32_t n, uint8_t *dst,
                         size_t dst_len, uint8_t *scratch, size_t scratch_len, uint8_t *raw, size_t raw_len,
                         uint32_t *failed_out, int *detail_out);
/*
 * bs_packw: appends chunk records to pack files through page-aligned
 * staging buffers of stage_bytes (a multiple of 4096), nstages >= 2 of
 * them, and an I/O thread of its own that writes each full buffer with
 * pwrite while the caller fills the next (O_DIRECT if the caller set it on
 * the descriptor). One thread adds; any thread may wait.
 *   bs_packw_begin   starts a pack on fd (written from offset 0) with its
 *                    header bytes. On failure no pack is open (end is not
 *                    called for it).
 *   bs_packw_add     appends one record per rec: the 32-byte record header
 *                    (magic, codec, kind, raw_len, stored_len, id; FORMAT.md)
 *                    and the stored_len bytes at base + src_off. The bytes
 *                    are copied before it returns. offsets_out[k] gets the
 *                    record's offset in the pack. It blocks while every
 *                    staging buffer is waiting for the device.
 *   bs_packw_append  appends len raw bytes (a pack's trailer: its record
 *                    index and tail, FORMAT.md) after the records.
 *   bs_packw_offset  the logical end of the current pack's bytes.
 *   bs_packw_end     pads the last buffer with zeros to a multiple of 4096,
 *                    hands it to the I/O thread and detaches the pack:
 *                    *size_out = its logical size, *seq_out = the number
 *                    of its last write. It does not wait.
 *   bs_packw_wait    blocks until writes 1..seq are done (every write handed
 *                    over so far when seq is larger than the last number).
 * A failed write's errno is kept: that call and every later one return
 * BS_EIO with *err_out = errno (ENOSPC for a short write). The caller must
 * not close a pack's descriptor before bs_packw_wait for its seq returned.
 */
typedef struct bs_packw bs_packw;
typedef struct {
    uint32_t src_off;    /* where the stored bytes start, from base */
    uint32_t stored_len; /* bytes after the record header */
    uint32_t raw_len;    /* the raw (decoded) length */
    uint8_t codec;       /* BS_CODEC_* */
    uint8_t kind;        /* BS_KIND_* */
    uint8_t id[16];      /* the record's id */
} bs_pack_rec;

bs_packw *bs_packw_new(uint32_t stage_bytes, uint32_t nstages);
void bs_packw_free(bs_packw *w);
int bs_packw_begin(bs_packw *w, int fd, const uint8_t *header, uint32_t header_len, int *err_out);
int bs_packw_add(bs_packw *w, const uint8_t *base, const bs_pack_rec *recs, uint32_t n,
                 uint64_t *offsets_out, int *err_out);
int bs_packw_append(bs_packw *w, const uint8_t *data, uint32_t len, int *err_out);
uint64_t bs_packw_offset(const bs_packw *w);
int bs_packw_end(bs_packw *w, uint64_t *seq_out, uint64_t *size_out, int *err_out);
int bs_packw_wait(bs_packw *w, uint64_t seq, int *err_out);
/*
 * bs_guard (guard.c): reads past the end of a memory-mapped file read zeros instead of raising SIGBUS.
 *   bs_guard_install     installs the SIGBUS handler once per process (the one installed before it
 *                        still gets every fault outside the registered ranges). BS_EIO if sigaction fails.
 *   bs_guard_add         registers [start, start+length) (a catalog's map); BS_EINVAL when 32 are held.
 *   bs_guard_remove      forgets the range that starts at start (before that map is unmapped).
 *   bs_guard_faults      how many faults the handler has answered with a zero page so far: a map that got
 *                        one reads zeros where the file ends and must be closed (unmapped) by its owner.
 *   bs_guard_abort_exit  makes SIGABRT write message (one line, with what C code printed to stdio's
 *                        stderr in brackets: LMDB's assertion) to descriptor 2 and exit(1): the CLI's
 *                        last resort for LMDB's assertions on damaged pages. BS_EIO if sigaction fails.
 */
int bs_guard_install(void);
int bs_guard_add(uint64_t start, uint64_t length);
int bs_guard_remove(uint64_t start);
uint64_t bs_guard_faults(void);
int bs_guard_abort_exit(const char *message);
/*
 * Image sources (blocksnap/image/) describe one window of a guest disk as consecutive extents, each
 * saying where its guest bytes come from.
 *   BS_EXT_ZERO     reads as zeros; nothing is read (a zero or unallocated cluster, a hole, the part
 *                   of a disk past its backing file's end).
 *   BS_EXT_DATA     length bytes at host_off of fd; the file's holes (SEEK_DATA/SEEK_HOLE) read as
 *                   zeros without being read, and so do bytes past the file's end (as QEMU reads a
 *                   qcow2's data clusters).
 *   BS_EXT_RAW      like DATA, but the file must reach host_off+length: a file that shrank is
 *                   BS_ESHORT (raw images).
 *   BS_EXT_DEFLATE  one compressed qcow2 cluster: stored_len bytes at host_off (past the file's end:
 *   BS_EXT_ZSTD     zeros) decode to cluster_len bytes, raw deflate (RFC 1951, 4 KiB window) or
 *                   zstd; the extent is bytes [skip, skip+length) of the decoded cluster. Decoding
 *                   that does not produce the whole cluster is BS_EDATA.
 */
#define BS_EXT_ZERO 0
#define BS_EXT_DATA 1
#define BS_EXT_RAW 2
#define BS_EXT_DEFLATE 3
#define BS_EXT_ZSTD 4
#define BS_EXT_MAX_CLUSTER 2097152 /* the largest qcow2 cluster: 2 MiB */
#define BS_EXT_MAX_STORED 2101248  /* a compressed cluster's largest stored size: one cluster + 4 KiB */

typedef struct {
    uint64_t length;      /* guest bytes this extent covers */
    uint64_t host_off;    /* where they (or the compressed cluster) start in fd */
    int fd;
    uint8_t kind;         /* BS_EXT_* */
    uint32_t stored_len;  /* compressed: bytes to read at host_off */
    uint32_t cluster_len; /* compressed: the decoded cluster's size */
    uint32_t skip;        /* compressed: where in the decoded cluster this extent starts */
} bs_extent;

/* A decoding context for one thread: zstd and zlib decoders and a cluster of scratch each way. NULL
 * when out of memory. */
typedef struct bs_xctx bs_xctx;
bs_xctx *bs_xctx_new(void);
void bs_xctx_free(bs_xctx *x);

/*
 * bs_scan_extents: bs_scan for a window that n_ext extents describe: the extents' lengths must add up
 * to length (else BS_EINVAL). The window is filled into buf (chunk i at buf + i*chunk_size), then
 * classified, hashed and compared with parent_ids exactly as bs_scan does; a chunk that lies wholly in
 * ZERO extents and file holes is a HOLE (never read). A host range that wraps past 2^64 is BS_EINVAL.
 * Outputs as bs_scan. On BS_EIO (*err_out =
 * errno), BS_ESHORT, BS_EDATA (a compressed cluster that does not decode) or BS_EINVAL (a malformed
 * extent) *failed_out is the index of the extent that failed (n_ext when none did) and the outputs must
 * be discarded.
 */
int bs_scan_extents(bs_xctx *x, const bs_extent *ext, uint32_t n_ext, uint64_t length, uint32_t chunk_size,
                    uint8_t *buf, size_t buf_len, const uint8_t *parent_ids, uint32_t parent_n,
                    uint8_t *ids_out, uint8_t *flags_out, uint32_t *changed_out, uint32_t *n_changed,
                    int *err_out, uint32_t *failed_out);
/* CDEF-END */

/* Internal to the C core (not part of the cffi interface). */

/* A pack record: 32-byte header (magic, codec, kind, 2 reserved, raw_len, stored_len, id; big-endian
 * integers, docs/FORMAT.md "Pack files"), then the stored bytes. */
#define BS_RECORD_SIZE 32
#define BS_RECORD_MAGIC "BSCK"

/* bs_read_full: pread all of dst[0:len) from off, retrying after EINTR and short reads. BS_EIO
 * with *err_out = errno when a read fails, BS_ESHORT when the file ends first (io.c). */
int bs_read_full(int fd, uint8_t *dst, size_t len, uint64_t off, int *err_out);

/* bs_read_padded: bs_read_full, but the bytes past the end of the file read as zeros (as QEMU's block layer
 * reads a file past its end: bdrv_aligned_preadv); BS_EIO as bs_read_full (io.c). */
int bs_read_padded(int fd, uint8_t *dst, size_t len, uint64_t off, int *err_out);

/* bs_write_full: pwrite all of p[0:len) at off, retrying after EINTR and short writes. BS_EIO with
 * *err_out = errno when a write fails, ENOSPC when one makes no progress (io.c). */
int bs_write_full(int fd, const uint8_t *p, size_t len, uint64_t off, int *err_out);

/* bs_classify: the second half of bs_scan and bs_scan_extents: given a filled window and flags that
 * mark HOLE chunks (the others 0), find ZERO chunks, hash the DATA ones, compare with the parent
 * (scan.c). */
int bs_classify(const uint8_t *buf, uint64_t length, uint32_t chunk_size,
                const uint8_t *parent_ids, uint32_t parent_n,
                uint8_t *ids_out, uint8_t *flags_out, uint32_t *changed_out, uint32_t *n_changed);

/* bs_fill_extents: the first half of bs_scan_extents (extent.c). */
int bs_fill_extents(bs_xctx *x, const bs_extent *ext, uint32_t n_ext, uint8_t *buf, uint64_t length,
                    uint32_t chunk_size, uint8_t *flags_out, int *err_out, uint32_t *failed_out);

#endif
