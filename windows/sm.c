#include "sm.h"
#include <string.h>

/* ---- SM3 ---------------------------------------------------------------------------- */

#define ROTL(x, n) (((x) << ((n) & 31)) | ((x) >> ((32 - ((n) & 31)) & 31)))
#define P0(x) ((x) ^ ROTL((x), 9) ^ ROTL((x), 17))
#define P1(x) ((x) ^ ROTL((x), 15) ^ ROTL((x), 23))

static const uint32_t SM3_IV[8] = {0x7380166f, 0x4914b2b9, 0x172442d7, 0xda8a0600,
                                   0xa96f30bc, 0x163138aa, 0xe38dee4d, 0xb0fb0e4e};

static uint32_t load32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void store32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static void sm3_compress(uint32_t v[8], const uint8_t block[64]) {
    uint32_t w[68], w1[64];
    int j;
    for (j = 0; j < 16; j++) w[j] = load32(block + 4 * j);
    for (j = 16; j < 68; j++)
        w[j] = P1(w[j - 16] ^ w[j - 9] ^ ROTL(w[j - 3], 15)) ^ ROTL(w[j - 13], 7) ^ w[j - 6];
    for (j = 0; j < 64; j++) w1[j] = w[j] ^ w[j + 4];
    uint32_t a = v[0], b = v[1], c = v[2], d = v[3], e = v[4], f = v[5], g = v[6], h = v[7];
    for (j = 0; j < 64; j++) {
        uint32_t t = j < 16 ? 0x79cc4519 : 0x7a879d8a;
        uint32_t ss1 = ROTL(ROTL(a, 12) + e + ROTL(t, j), 7);
        uint32_t ss2 = ss1 ^ ROTL(a, 12);
        uint32_t ff = j < 16 ? (a ^ b ^ c) : ((a & b) | (a & c) | (b & c));
        uint32_t gg = j < 16 ? (e ^ f ^ g) : ((e & f) | (~e & g));
        uint32_t tt1 = ff + d + ss2 + w1[j];
        uint32_t tt2 = gg + h + ss1 + w[j];
        d = c; c = ROTL(b, 9); b = a; a = tt1;
        h = g; g = ROTL(f, 19); f = e; e = P0(tt2);
    }
    v[0] ^= a; v[1] ^= b; v[2] ^= c; v[3] ^= d; v[4] ^= e; v[5] ^= f; v[6] ^= g; v[7] ^= h;
}

typedef struct { uint32_t v[8]; uint8_t buf[64]; size_t used; uint64_t total; } sm3_ctx;

static void sm3_init(sm3_ctx *c) { memcpy(c->v, SM3_IV, sizeof SM3_IV); c->used = 0; c->total = 0; }

static void sm3_update(sm3_ctx *c, const uint8_t *data, size_t len) {
    c->total += len;
    while (len > 0) {
        size_t take = 64 - c->used < len ? 64 - c->used : len;
        memcpy(c->buf + c->used, data, take);
        c->used += take; data += take; len -= take;
        if (c->used == 64) { sm3_compress(c->v, c->buf); c->used = 0; }
    }
}

static void sm3_final(sm3_ctx *c, uint8_t out[32]) {
    uint64_t bits = c->total * 8;
    uint8_t pad = 0x80, zero = 0, lenbuf[8];
    int i;
    sm3_update(c, &pad, 1);
    while (c->used != 56) sm3_update(c, &zero, 1);
    for (i = 0; i < 8; i++) lenbuf[i] = (uint8_t)(bits >> (56 - 8 * i));
    sm3_update(c, lenbuf, 8);
    for (i = 0; i < 8; i++) store32(out + 4 * i, c->v[i]);
}

void sm3(const uint8_t *data, size_t len, uint8_t out[32]) {
    sm3_ctx c;
    sm3_init(&c);
    sm3_update(&c, data, len);
    sm3_final(&c, out);
}

void hmac_sm3(const uint8_t *key, size_t key_len, const uint8_t *data, size_t len, uint8_t out[32]) {
    uint8_t k[64] = {0}, pad[64], inner[32];
    sm3_ctx c;
    int i;
    if (key_len > 64) sm3(key, key_len, k); else memcpy(k, key, key_len);
    for (i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    sm3_init(&c); sm3_update(&c, pad, 64); sm3_update(&c, data, len); sm3_final(&c, inner);
    for (i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    sm3_init(&c); sm3_update(&c, pad, 64); sm3_update(&c, inner, 32); sm3_final(&c, out);
}

/* ---- SM4 ---------------------------------------------------------------------------- */

static const uint8_t SBOX[256] = {
    0xd6,0x90,0xe9,0xfe,0xcc,0xe1,0x3d,0xb7,0x16,0xb6,0x14,0xc2,0x28,0xfb,0x2c,0x05,
    0x2b,0x67,0x9a,0x76,0x2a,0xbe,0x04,0xc3,0xaa,0x44,0x13,0x26,0x49,0x86,0x06,0x99,
    0x9c,0x42,0x50,0xf4,0x91,0xef,0x98,0x7a,0x33,0x54,0x0b,0x43,0xed,0xcf,0xac,0x62,
    0xe4,0xb3,0x1c,0xa9,0xc9,0x08,0xe8,0x95,0x80,0xdf,0x94,0xfa,0x75,0x8f,0x3f,0xa6,
    0x47,0x07,0xa7,0xfc,0xf3,0x73,0x17,0xba,0x83,0x59,0x3c,0x19,0xe6,0x85,0x4f,0xa8,
    0x68,0x6b,0x81,0xb2,0x71,0x64,0xda,0x8b,0xf8,0xeb,0x0f,0x4b,0x70,0x56,0x9d,0x35,
    0x1e,0x24,0x0e,0x5e,0x63,0x58,0xd1,0xa2,0x25,0x22,0x7c,0x3b,0x01,0x21,0x78,0x87,
    0xd4,0x00,0x46,0x57,0x9f,0xd3,0x27,0x52,0x4c,0x36,0x02,0xe7,0xa0,0xc4,0xc8,0x9e,
    0xea,0xbf,0x8a,0xd2,0x40,0xc7,0x38,0xb5,0xa3,0xf7,0xf2,0xce,0xf9,0x61,0x15,0xa1,
    0xe0,0xae,0x5d,0xa4,0x9b,0x34,0x1a,0x55,0xad,0x93,0x32,0x30,0xf5,0x8c,0xb1,0xe3,
    0x1d,0xf6,0xe2,0x2e,0x82,0x66,0xca,0x60,0xc0,0x29,0x23,0xab,0x0d,0x53,0x4e,0x6f,
    0xd5,0xdb,0x37,0x45,0xde,0xfd,0x8e,0x2f,0x03,0xff,0x6a,0x72,0x6d,0x6c,0x5b,0x51,
    0x8d,0x1b,0xaf,0x92,0xbb,0xdd,0xbc,0x7f,0x11,0xd9,0x5c,0x41,0x1f,0x10,0x5a,0xd8,
    0x0a,0xc1,0x31,0x88,0xa5,0xcd,0x7b,0xbd,0x2d,0x74,0xd0,0x12,0xb8,0xe5,0xb4,0xb0,
    0x89,0x69,0x97,0x4a,0x0c,0x96,0x77,0x7e,0x65,0xb9,0xf1,0x09,0xc5,0x6e,0xc6,0x84,
    0x18,0xf0,0x7d,0xec,0x3a,0xdc,0x4d,0x20,0x79,0xee,0x5f,0x3e,0xd7,0xcb,0x39,0x48};

static const uint32_t FK[4] = {0xa3b1bac6, 0x56aa3350, 0x677d9197, 0xb27022dc};

static uint32_t tau(uint32_t a) {
    return ((uint32_t)SBOX[a >> 24] << 24) | ((uint32_t)SBOX[(a >> 16) & 0xff] << 16) |
           ((uint32_t)SBOX[(a >> 8) & 0xff] << 8) | SBOX[a & 0xff];
}

static void sm4_keys(const uint8_t key[16], uint32_t rk[32]) {
    uint32_t k[4];
    int i;
    for (i = 0; i < 4; i++) k[i] = load32(key + 4 * i) ^ FK[i];
    for (i = 0; i < 32; i++) {
        /* CK[i] byte j = (4i + j) * 7 mod 256 */
        uint32_t ck = 0;
        int j;
        for (j = 0; j < 4; j++) ck = (ck << 8) | (uint8_t)((4 * i + j) * 7);
        uint32_t t = tau(k[(i + 1) % 4] ^ k[(i + 2) % 4] ^ k[(i + 3) % 4] ^ ck);
        k[i % 4] ^= t ^ ROTL(t, 13) ^ ROTL(t, 23);
        rk[i] = k[i % 4];
    }
}

void sm4_block(const uint8_t key[16], const uint8_t in[16], uint8_t out[16], int decrypt) {
    uint32_t rk[32], x[4];
    int i;
    sm4_keys(key, rk);
    for (i = 0; i < 4; i++) x[i] = load32(in + 4 * i);
    for (i = 0; i < 32; i++) {
        uint32_t t = tau(x[(i + 1) % 4] ^ x[(i + 2) % 4] ^ x[(i + 3) % 4] ^ rk[decrypt ? 31 - i : i]);
        x[i % 4] ^= t ^ ROTL(t, 2) ^ ROTL(t, 10) ^ ROTL(t, 18) ^ ROTL(t, 24);
    }
    for (i = 0; i < 4; i++) store32(out + 4 * i, x[3 - i]);
}

size_t sm4_cbc_encrypt(const uint8_t key[16], const uint8_t iv[16], const uint8_t *in, size_t len, uint8_t *out) {
    uint8_t chain[16], block[16];
    size_t n = (len / 16 + 1) * 16, i;
    int j;
    memcpy(chain, iv, 16);
    for (i = 0; i < n; i += 16) {
        for (j = 0; j < 16; j++) {
            uint8_t b = i + j < len ? in[i + j] : (uint8_t)(n - len);
            block[j] = b ^ chain[j];
        }
        sm4_block(key, block, out + i, 0);
        memcpy(chain, out + i, 16);
    }
    return n;
}

long sm4_cbc_decrypt(const uint8_t key[16], const uint8_t iv[16], const uint8_t *in, size_t len, uint8_t *out) {
    uint8_t chain[16];
    size_t i;
    int j;
    if (len == 0 || len % 16) return -1;
    memcpy(chain, iv, 16);
    for (i = 0; i < len; i += 16) {
        uint8_t cipher[16]; /* kept: out may be in (decrypting in place) */
        memcpy(cipher, in + i, 16);
        sm4_block(key, cipher, out + i, 1);
        for (j = 0; j < 16; j++) out[i + j] ^= chain[j];
        memcpy(chain, cipher, 16);
    }
    uint8_t pad = out[len - 1];
    if (pad == 0 || pad > 16) return -1;
    for (j = 0; j < pad; j++)
        if (out[len - 1 - j] != pad) return -1;
    return (long)(len - pad);
}

/* ---- base64, hex ------------------------------------------------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t base64_encode(const uint8_t *in, size_t len, char *out) {
    size_t i, o = 0;
    for (i = 0; i + 2 < len; i += 3) {
        out[o++] = B64[in[i] >> 2];
        out[o++] = B64[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
        out[o++] = B64[((in[i + 1] & 15) << 2) | (in[i + 2] >> 6)];
        out[o++] = B64[in[i + 2] & 63];
    }
    if (len - i == 1) {
        out[o++] = B64[in[i] >> 2];
        out[o++] = B64[(in[i] & 3) << 4];
        out[o++] = '='; out[o++] = '=';
    } else if (len - i == 2) {
        out[o++] = B64[in[i] >> 2];
        out[o++] = B64[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
        out[o++] = B64[(in[i + 1] & 15) << 2];
        out[o++] = '=';
    }
    out[o] = 0;
    return o;
}

static int b64_value(char c) {
    const char *p = c ? strchr(B64, c) : NULL;
    return p ? (int)(p - B64) : -1;
}

long base64_decode(const char *in, size_t len, uint8_t *out) {
    size_t i, o = 0;
    if (len % 4) return -1;
    for (i = 0; i < len; i += 4) {
        int v[4], k, pads = 0;
        for (k = 0; k < 4; k++) {
            if (in[i + k] == '=' && i + 4 == len && k >= 2) { v[k] = 0; pads++; }
            else if (pads || (v[k] = b64_value(in[i + k])) < 0) return -1;
        }
        out[o++] = (uint8_t)((v[0] << 2) | (v[1] >> 4));
        if (pads < 2) out[o++] = (uint8_t)((v[1] << 4) | (v[2] >> 2));
        if (pads < 1) out[o++] = (uint8_t)((v[2] << 6) | v[3]);
    }
    return (long)o;
}

void to_hex(const uint8_t *in, size_t len, char *out) {
    static const char digits[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < len; i++) { out[2 * i] = digits[in[i] >> 4]; out[2 * i + 1] = digits[in[i] & 15]; }
    out[2 * len] = 0;
}
