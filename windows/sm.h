/* SM3 (GB/T 32905), HMAC-SM3 (RFC 2104 over SM3), SM4-CBC (GB/T 32907) with PKCS#7, base64.
   Small and plain: no library offers these on the HIS's Windows PC. */
#ifndef SCANBOX_SM_H
#define SCANBOX_SM_H
#include <stddef.h>
#include <stdint.h>

void sm3(const uint8_t *data, size_t len, uint8_t out[32]);
void hmac_sm3(const uint8_t *key, size_t key_len, const uint8_t *data, size_t len, uint8_t out[32]);
void sm4_block(const uint8_t key[16], const uint8_t in[16], uint8_t out[16], int decrypt);
/* out must hold len + 16 bytes; returns the ciphertext length (a multiple of 16) */
size_t sm4_cbc_encrypt(const uint8_t key[16], const uint8_t iv[16], const uint8_t *in, size_t len, uint8_t *out);
/* returns the plaintext length, or -1 when the padding is wrong */
long sm4_cbc_decrypt(const uint8_t key[16], const uint8_t iv[16], const uint8_t *in, size_t len, uint8_t *out);
/* out must hold 4 * ((len + 2) / 3) + 1 bytes */
size_t base64_encode(const uint8_t *in, size_t len, char *out);
/* returns the decoded length, or -1 for text that is not base64; out must hold len * 3 / 4 */
long base64_decode(const char *in, size_t len, uint8_t *out);
void to_hex(const uint8_t *in, size_t len, char *out);
#endif
