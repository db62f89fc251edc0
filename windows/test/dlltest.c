/* Drives WSCallDLL.dll and OneTrans2.dll the way the specs' VC++ example does (LoadLibrary,
   GetProcAddress, __stdcall, caller-owned buffers), for tests/windows/test_dlls.py under wine.

   dlltest vectors                               the crypto's standard test vectors
   dlltest read FUNCTION OUTSIZE MSGSIZE          ReadPeopleInfo_V2 / ReadCardInfo_V2
   dlltest wsc FUNCTION INPUTFILE OUTSIZE MSGSIZE a WSC_* call, szInput from a file (GBK bytes)
   dlltest showform                              ShowForm_V2
   dlltest onetrans INPUTFILE OUTSIZE            OneTrans, pInData from a file
   dlltest concurrent FIRST SECOND               OneTrans(FIRST) in a thread; after a line on
                                                 stdin, OneTrans(SECOND) while the first waits
   dlltest trust CERTFILE                        a CA certificate (DER) into this user's trusted
                                                 roots, as a hospital installs its own CA

   Every buffer is followed by 64 guard bytes, checked after the call. Output: "rc=N", then
   "out=HEX" / "msg=HEX" (the bytes up to the NUL), then "guard=ok" or "guard=BROKEN". */
#include <windows.h>
#include <wincrypt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "sm.h"

#define GUARD 64

typedef int(__stdcall *read_fn)(char *, char *, char *);
typedef int(__stdcall *wsc_fn)(const char *, const char *, char *, char *, char *);
typedef int(__stdcall *form_fn)(void);
typedef int(__stdcall *onetrans_fn)(char *, char *);

static char *guarded(size_t size) {
    char *b = malloc(size + GUARD);
    memset(b, 0, size);
    memset(b + size, 0xCC, GUARD);
    return b;
}

static int guard_ok(const char *b, size_t size) {
    size_t i;
    for (i = 0; i < GUARD; i++) if ((unsigned char)b[size + i] != 0xCC) return 0;
    return memchr(b, 0, size) != NULL; /* and NUL-terminated inside the buffer */
}

static void print_hex(const char *label, const char *b, size_t size) {
    size_t i, n = strnlen(b, size);
    printf("%s=", label);
    for (i = 0; i < n; i++) printf("%02x", (unsigned char)b[i]);
    printf("\n");
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { printf("error=cannot open %s\n", path); exit(2); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = calloc(1, (size_t)n + 1);
    if (fread(text, 1, (size_t)n, f) != (size_t)n) { printf("error=cannot read %s\n", path); exit(2); }
    fclose(f);
    return text;
}

static FARPROC load(const char *dll, const char *name) {
    HINSTANCE inst = LoadLibraryA(dll);
    if (!inst) { printf("error=LoadLibrary(%s) failed (%lu)\n", dll, GetLastError()); exit(2); }
    FARPROC f = GetProcAddress(inst, name);
    if (!f) { printf("error=GetProcAddress(%s) failed\n", name); exit(2); }
    return f;
}

static int expect_hex(const char *what, const unsigned char *got, size_t n, const char *want) {
    char hex[129];
    to_hex(got, n, hex);
    int ok = !strcmp(hex, want);
    printf("%s=%s %s\n", what, hex, ok ? "ok" : "WRONG");
    return ok;
}

static int vectors(void) {
    unsigned char out[32], block[16], back[16], key[64];
    int ok = 1;
    /* GB/T 32905 A.1, A.2 */
    sm3((const uint8_t *)"abc", 3, out);
    ok &= expect_hex("sm3_abc", out, 32, "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0");
    sm3((const uint8_t *)"abcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcd", 64, out);
    ok &= expect_hex("sm3_abcd16", out, 32, "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732");
    /* GB/T 32907 A.1: key = plaintext = 0123456789abcdeffedcba9876543210 */
    static const unsigned char k[16] = {0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
                                        0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10};
    sm4_block(k, k, block, 0);
    ok &= expect_hex("sm4_a1", block, 16, "681edf34d206965e86b3e94f536e4246");
    sm4_block(k, block, back, 1);
    ok &= expect_hex("sm4_a1_back", back, 16, "0123456789abcdeffedcba9876543210");
    /* GB/T 32907 A.2: the same block encrypted 1 000 000 times */
    {
        int i;
        memcpy(block, k, 16);
        for (i = 0; i < 1000000; i++) { sm4_block(k, block, back, 0); memcpy(block, back, 16); }
        ok &= expect_hex("sm4_a2", block, 16, "595298c7c6fd271f0402f804c33d3f66");
    }
    /* scanbox's keys (docs/api.md): app_key "scanbox-test-key" */
    const char *app_key = "scanbox-test-key";
    hmac_sm3((const uint8_t *)app_key, strlen(app_key), (const uint8_t *)"scanbox onetrans mac v1", 23, key);
    ok &= expect_hex("mac_key", key, 32, "1776f0b958f9e57c5b7f969689f7a1cf4a4778cef31e965264b28e01feeba6fc");
    unsigned char mac[32];
    memcpy(mac, key, 32);
    hmac_sm3((const uint8_t *)app_key, strlen(app_key), (const uint8_t *)"scanbox onetrans sm4 v1", 23, key);
    ok &= expect_hex("sm4_key", key, 16, "a0ed35583a58aaee16667abf8aa89ea3");
    /* sign of {"b":1,"a":"张"}: HMAC-SM3(mac key, canonical {"a":"张","b":1}) */
    static const char canonical[] = "{\"a\":\"\xe5\xbc\xa0\",\"b\":1}";
    hmac_sm3(mac, 32, (const uint8_t *)canonical, strlen(canonical), out);
    ok &= expect_hex("sign", out, 32, "f8a78b046242c2d82fee7e27f9c32abd09290be9ddb5a9fd2c9c7687a2da44f9");
    /* data {"a":1} under the SM4 key, IV 00..0f */
    unsigned char iv[16], sealed[48];
    char b64[80];
    int i;
    for (i = 0; i < 16; i++) iv[i] = (unsigned char)i;
    memcpy(sealed, iv, 16);
    size_t n = sm4_cbc_encrypt(key, iv, (const uint8_t *)"{\"a\":1}", 7, sealed + 16);
    base64_encode(sealed, 16 + n, b64);
    printf("data=%s %s\n", b64, strcmp(b64, "AAECAwQFBgcICQoLDA0ODwMOfk4m5O/SMR/KdDTKZ7o=") ? "WRONG" : "ok");
    ok &= !strcmp(b64, "AAECAwQFBgcICQoLDA0ODwMOfk4m5O/SMR/KdDTKZ7o=");
    /* and back, in place, as the DLL decrypts */
    long plain = sm4_cbc_decrypt(key, sealed, sealed + 16, n, sealed + 16);
    int back_ok = plain == 7 && !memcmp(sealed + 16, "{\"a\":1}", 7);
    printf("data_back=%s\n", back_ok ? "ok" : "WRONG");
    ok &= back_ok;
    printf("rc=%d\n", ok ? 0 : 1);
    return ok ? 0 : 1;
}

typedef struct { onetrans_fn fn; char *in, *out; int rc; } job_t;

static DWORD WINAPI run_job(LPVOID arg) {
    job_t *job = arg;
    job->rc = job->fn(job->in, job->out);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2) { printf("usage: see the source\n"); return 2; }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "vectors")) return vectors();
    if (!strcmp(cmd, "read") && argc == 5) {
        size_t out_size = (size_t)atoi(argv[3]), msg_size = (size_t)atoi(argv[4]);
        read_fn fn = (read_fn)load("WSCallDLL.dll", argv[2]);
        char *out = guarded(out_size), *msg = guarded(msg_size);
        char reserve[] = "0001|dddd|0|0|0|0|0|0";
        int rc = fn(out, msg, reserve);
        printf("rc=%d\n", rc);
        print_hex("out", out, out_size);
        print_hex("msg", msg, msg_size);
        printf("guard=%s\n", guard_ok(out, out_size) && guard_ok(msg, msg_size) ? "ok" : "BROKEN");
        return 0;
    }
    if (!strcmp(cmd, "wsc") && argc == 6) {
        size_t out_size = (size_t)atoi(argv[4]), msg_size = (size_t)atoi(argv[5]);
        wsc_fn fn = (wsc_fn)load("WSCallDLL.dll", argv[2]);
        char *input = slurp(argv[3]);
        char *out = guarded(out_size), *msg = guarded(msg_size), reserve[64] = "";
        int rc = fn("http://platform.example/ignored?wsdl", input, msg, out, reserve);
        printf("rc=%d\n", rc);
        print_hex("out", out, out_size);
        print_hex("msg", msg, msg_size);
        printf("guard=%s\n", guard_ok(out, out_size) && guard_ok(msg, msg_size) ? "ok" : "BROKEN");
        return 0;
    }
    if (!strcmp(cmd, "showform")) {
        form_fn fn = (form_fn)load("WSCallDLL.dll", "ShowForm_V2");
        printf("rc=%d\n", fn());
        return 0;
    }
    if (!strcmp(cmd, "onetrans") && argc == 4) {
        size_t out_size = (size_t)atoi(argv[3]);
        onetrans_fn fn = (onetrans_fn)load("OneTrans2.dll", "OneTrans");
        char *in = slurp(argv[2]), *out = guarded(out_size);
        int rc = fn(in, out);
        printf("rc=%d\n", rc);
        print_hex("out", out, out_size);
        printf("guard=%s\n", guard_ok(out, out_size) ? "ok" : "BROKEN");
        return 0;
    }
    if (!strcmp(cmd, "concurrent") && argc == 4) {
        onetrans_fn fn = (onetrans_fn)load("OneTrans2.dll", "OneTrans");
        job_t first = {fn, slurp(argv[2]), guarded(8192), 0};
        char *second_in = slurp(argv[3]), *second_out = guarded(8192), line[16];
        HANDLE thread = CreateThread(NULL, 0, run_job, &first, 0, NULL);
        printf("started\n");
        if (!fgets(line, sizeof line, stdin)) return 2;
        int rc = fn(second_in, second_out);
        printf("second_rc=%d\n", rc);
        print_hex("second_out", second_out, 8192);
        WaitForSingleObject(thread, INFINITE);
        printf("rc=%d\n", first.rc);
        print_hex("out", first.out, 8192);
        printf("guard=%s\n", guard_ok(first.out, 8192) && guard_ok(second_out, 8192) ? "ok" : "BROKEN");
        return 0;
    }
    if (!strcmp(cmd, "trust") && argc == 3) {
        FILE *f = fopen(argv[2], "rb");
        unsigned char der[8192];
        size_t n = f ? fread(der, 1, sizeof der, f) : 0;
        if (f) fclose(f);
        HCERTSTORE root = CertOpenSystemStoreA(0, "ROOT");
        int ok = n && root && CertAddEncodedCertificateToStore(root, X509_ASN_ENCODING, der, (DWORD)n,
                                                               CERT_STORE_ADD_REPLACE_EXISTING, NULL);
        if (root) CertCloseStore(root, 0);
        printf("rc=%d\n", ok ? 0 : (int)GetLastError());
        return 0;
    }
    printf("usage: see the source\n");
    return 2;
}
