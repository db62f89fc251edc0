/* https:// to the box: TLS through Schannel (SSPI) over a Winsock socket, not WinHTTP.

   Why not WinHTTP: it shows the server's certificate only once its request is on its way (the
   only pre-send hook, WINHTTP_CALLBACK_STATUS_SENDING_REQUEST, comes after wine has built the
   request and cannot stop it), and a probe request followed by the real one may go out on a
   new connection that an active attacker chose. Here the one connection that carries the
   request is the one whose certificate was checked: handshake, then the certificate's SHA-256
   against the pin (or the PC's CAs and the box's name when there is no pin), and only then is
   the first byte of the request (its token, its body) encrypted and sent.

   One request per connection (Connection: close); the answer is read to its Content-Length,
   the end of its chunks, or the server's close. The same deadlines as the WinHTTP path: the
   connection within min(5 s, the call's time), the whole call within timeout_s. */
#define SECURITY_WIN32
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <wincrypt.h>
#include <security.h>
#include <schannel.h>
#include <bcrypt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"

#define MAX_ANSWER (16u << 20)
#ifndef SECURITY_FLAG_IGNORE_CERT_CN_INVALID
#define SECURITY_FLAG_IGNORE_CERT_CN_INVALID 0x00001000 /* wininet.h's; the SSL chain policy reads it */
#endif

typedef struct {
    SOCKET s;
    ULONGLONG deadline;
    int timeout_s;
    const char *url;
    char *host;           /* UTF-8, brackets of an IPv6 literal removed */
    CredHandle cred;
    int have_cred;
    CtxtHandle ctx;
    int have_ctx;
    DWORD flags;
    char *in;             /* received from the box, not yet decrypted */
    size_t in_len, in_cap;
    char *error;
    size_t error_cap;
} tls_t;

static http_result failed(tls_t *t, http_result result, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static http_result failed(tls_t *t, http_result result, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(t->error, t->error_cap, fmt, args);
    va_end(args);
    return result;
}

static http_result timed_out(tls_t *t) {
    return failed(t, HTTP_TIMEOUT, "the box did not answer within %d s (%.200s)", t->timeout_s, t->url);
}

static DWORD ms_left(ULONGLONG deadline) {
    ULONGLONG now = GetTickCount64();
    return now >= deadline ? 0 : (DWORD)(deadline - now);
}

/* 1 when the socket is ready, 0 at the deadline, -1 on an error */
static int wait_socket(SOCKET s, int for_write, ULONGLONG deadline) {
    fd_set ready, broken;
    struct timeval tv;
    DWORD ms = ms_left(deadline);
    if (!ms) return 0;
    FD_ZERO(&ready); FD_ZERO(&broken);
    FD_SET(s, &ready); FD_SET(s, &broken);
    tv.tv_sec = (long)(ms / 1000);
    tv.tv_usec = (long)(ms % 1000) * 1000;
    int n = select(0, for_write ? NULL : &ready, for_write ? &ready : NULL, &broken, &tv);
    if (n < 0) return -1;
    if (n == 0) return 0;
    return FD_ISSET(s, &broken) ? -1 : 1;
}

static http_result send_all(tls_t *t, const char *data, size_t len) {
    while (len) {
        int n = send(t->s, data, len > 0x10000 ? 0x10000 : (int)len, 0);
        if (n > 0) { data += n; len -= (size_t)n; continue; }
        if (WSAGetLastError() != WSAEWOULDBLOCK)
            return failed(t, HTTP_UNREACHABLE, "the connection to the box at %.200s broke (Winsock error %d)", t->url,
                          WSAGetLastError());
        int ready = wait_socket(t->s, 1, t->deadline);
        if (ready == 0) return timed_out(t);
        if (ready < 0) return failed(t, HTTP_UNREACHABLE, "the connection to the box at %.200s broke", t->url);
    }
    return HTTP_OK;
}

/* more bytes from the box into t->in; *closed when it closed the connection */
static http_result receive(tls_t *t, int *closed) {
    *closed = 0;
    if (t->in_len + 16384 > t->in_cap) {
        size_t cap = t->in_cap ? t->in_cap * 2 : 32768;
        char *grown = cap <= MAX_ANSWER + 65536 ? realloc(t->in, cap) : NULL;
        if (!grown) return failed(t, HTTP_FAILED, "the box's answer is over 16 MB");
        t->in = grown; t->in_cap = cap;
    }
    for (;;) {
        int n = recv(t->s, t->in + t->in_len, (int)(t->in_cap - t->in_len), 0);
        if (n > 0) { t->in_len += (size_t)n; return HTTP_OK; }
        if (n == 0) { *closed = 1; return HTTP_OK; }
        if (WSAGetLastError() != WSAEWOULDBLOCK)
            return failed(t, HTTP_UNREACHABLE, "the connection to the box at %.200s broke (Winsock error %d)", t->url,
                          WSAGetLastError());
        int ready = wait_socket(t->s, 0, t->deadline);
        if (ready == 0) return timed_out(t);
        if (ready < 0) return failed(t, HTTP_UNREACHABLE, "the connection to the box at %.200s broke", t->url);
    }
}

static http_result connect_to(tls_t *t, unsigned port, int connect_s) {
    struct addrinfo hints, *found = NULL, *a;
    char service[8];
    int last = 0;
    ULONGLONG connect_deadline = GetTickCount64() + (ULONGLONG)connect_s * 1000;
    if (connect_deadline > t->deadline) connect_deadline = t->deadline;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    snprintf(service, sizeof service, "%u", port);
    if (getaddrinfo(t->host, service, &hints, &found) || !found)
        return failed(t, HTTP_UNREACHABLE, "cannot reach the box at %.200s (no address for %.100s)", t->url, t->host);
    for (a = found; a; a = a->ai_next) {
        u_long nonblocking = 1;
        int error = 0, size = sizeof error;
        SOCKET s = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (s == INVALID_SOCKET) { last = WSAGetLastError(); continue; }
        ioctlsocket(s, FIONBIO, &nonblocking);
        if (connect(s, a->ai_addr, (int)a->ai_addrlen) && WSAGetLastError() != WSAEWOULDBLOCK) {
            last = WSAGetLastError();
            closesocket(s);
            continue;
        }
        int ready = wait_socket(s, 1, connect_deadline);
        if (ready > 0 && !getsockopt(s, SOL_SOCKET, SO_ERROR, (char *)&error, &size) && !error) {
            t->s = s;
            freeaddrinfo(found);
            return HTTP_OK;
        }
        last = ready == 0 ? WSAETIMEDOUT : error ? error : WSAECONNREFUSED;
        closesocket(s);
    }
    freeaddrinfo(found);
    if (last == WSAETIMEDOUT)
        return failed(t, HTTP_TIMEOUT, "the box did not answer within %d s (%.200s)", connect_s, t->url);
    return failed(t, HTTP_UNREACHABLE, "cannot reach the box at %.200s (Winsock error %d)", t->url, last);
}

static const char *sspi_text(SECURITY_STATUS status) {
    switch ((unsigned long)status) {
    case (unsigned long)SEC_E_UNTRUSTED_ROOT: return "a certificate no CA of this PC vouches for";
    case (unsigned long)SEC_E_WRONG_PRINCIPAL: return "a certificate for another name";
    case (unsigned long)SEC_E_CERT_EXPIRED: return "an expired certificate, or this PC's clock is wrong";
    case (unsigned long)SEC_E_ALGORITHM_MISMATCH: return "no TLS version or cipher in common (the box speaks TLS 1.2 or later)";
    case (unsigned long)SEC_E_ILLEGAL_MESSAGE: return "a TLS message Schannel could not read";
    case (unsigned long)SEC_E_INTERNAL_ERROR: return "Schannel's internal error";
    default: return "Schannel refused it";
    }
}

/* the handshake from where it stands: t->in holds what the box sent and Schannel has not read */
static http_result handshake(tls_t *t) {
    for (;;) {
        int closed = 0;
        http_result r;
        if (!t->in_len) {
            if ((r = receive(t, &closed)) != HTTP_OK) return r;
            if (closed) return failed(t, HTTP_UNREACHABLE, "the box at %.200s closed the connection during the TLS "
                                      "handshake: is its listener https (api.tls)?", t->url);
        }
        SecBuffer in[2] = {{(unsigned long)t->in_len, SECBUFFER_TOKEN, t->in}, {0, SECBUFFER_EMPTY, NULL}};
        SecBuffer out[1] = {{0, SECBUFFER_TOKEN, NULL}};
        SecBufferDesc in_desc = {SECBUFFER_VERSION, 2, in}, out_desc = {SECBUFFER_VERSION, 1, out};
        unsigned long attributes = 0;
        SECURITY_STATUS status = InitializeSecurityContextA(&t->cred, &t->ctx, t->host, t->flags, 0, 0, &in_desc, 0,
                                                            NULL, &out_desc, &attributes, NULL);
        if (status == SEC_E_INCOMPLETE_MESSAGE) {
            /* not a whole TLS record yet: read more after what is there */
            if ((r = receive(t, &closed)) != HTTP_OK) return r;
            if (closed) return failed(t, HTTP_UNREACHABLE, "the box at %.200s closed the connection during the TLS "
                                      "handshake", t->url);
            continue;
        }
        if (out[0].cbBuffer && out[0].pvBuffer) {
            r = send_all(t, out[0].pvBuffer, out[0].cbBuffer);
            FreeContextBuffer(out[0].pvBuffer);
            if (r != HTTP_OK) return r;
        }
        if (status == SEC_E_OK || status == SEC_I_CONTINUE_NEEDED) {
            if (in[1].BufferType == SECBUFFER_EXTRA && in[1].cbBuffer && in[1].cbBuffer <= t->in_len) {
                memmove(t->in, t->in + t->in_len - in[1].cbBuffer, in[1].cbBuffer);
                t->in_len = in[1].cbBuffer;
            } else {
                t->in_len = 0;
            }
            if (status == SEC_E_OK) return HTTP_OK;
            continue;
        }
        if (status == SEC_I_INCOMPLETE_CREDENTIALS) /* a scanbox never asks for one */
            return failed(t, HTTP_UNREACHABLE, "the server at %.200s asks for a client certificate: not a scanbox",
                          t->url);
        /* Schannel's own verdict on the certificate (no pin: its automatic validation, on Windows) */
        int certificate = status == SEC_E_UNTRUSTED_ROOT || status == SEC_E_WRONG_PRINCIPAL ||
                          status == SEC_E_CERT_EXPIRED || status == SEC_E_CERT_UNKNOWN;
        return failed(t, certificate ? HTTP_UNTRUSTED : HTTP_UNREACHABLE, "TLS with the box at %.200s failed: %s "
                      "(0x%08lx)%s", t->url, sspi_text(status), (unsigned long)status,
                      certificate ? "; nothing was sent. A box's own certificate needs its fingerprint in the ini "
                                    "(fingerprint=, as scanbox tls show on the box says)" : "");
    }
}

static int sha256(const unsigned char *data, ULONG len, unsigned char digest[32]) {
    BCRYPT_ALG_HANDLE algorithm = NULL;
    BCRYPT_HASH_HANDLE hash = NULL;
    int ok = BCRYPT_SUCCESS(BCryptOpenAlgorithmProvider(&algorithm, BCRYPT_SHA256_ALGORITHM, NULL, 0)) &&
             BCRYPT_SUCCESS(BCryptCreateHash(algorithm, &hash, NULL, 0, NULL, 0, 0)) &&
             BCRYPT_SUCCESS(BCryptHashData(hash, (PUCHAR)data, len, 0)) &&
             BCRYPT_SUCCESS(BCryptFinishHash(hash, digest, 32, 0));
    if (hash) BCryptDestroyHash(hash);
    if (algorithm) BCryptCloseAlgorithmProvider(algorithm, 0);
    return ok;
}

/* the certificate names the IP address `host` in its subject alternative names */
static int names_address(PCCERT_CONTEXT cert, const char *host) {
    unsigned char address[16];
    int length = 0, found = 0;
    DWORD i, size = 0;
    CERT_ALT_NAME_INFO *names = NULL;
    if (inet_pton(AF_INET, host, address) == 1) length = 4;
    else if (inet_pton(AF_INET6, host, address) == 1) length = 16;
    PCERT_EXTENSION extension = CertFindExtension(szOID_SUBJECT_ALT_NAME2, cert->pCertInfo->cExtension,
                                                  cert->pCertInfo->rgExtension);
    if (!length || !extension ||
        !CryptDecodeObjectEx(X509_ASN_ENCODING, X509_ALTERNATE_NAME, extension->Value.pbData, extension->Value.cbData,
                             CRYPT_DECODE_ALLOC_FLAG, NULL, &names, &size))
        return 0;
    for (i = 0; i < names->cAltEntry && !found; i++) {
        const CERT_ALT_NAME_ENTRY *name = &names->rgAltEntry[i];
        found = name->dwAltNameChoice == CERT_ALT_NAME_IP_ADDRESS && name->IPAddress.cbData == (DWORD)length &&
                !memcmp(name->IPAddress.pbData, address, (size_t)length);
    }
    LocalFree(names);
    return found;
}

static DWORD ssl_policy(PCCERT_CHAIN_CONTEXT chain, WCHAR *name) {
    SSL_EXTRA_CERT_CHAIN_POLICY_PARA ssl;
    CERT_CHAIN_POLICY_PARA policy;
    CERT_CHAIN_POLICY_STATUS verdict;
    memset(&ssl, 0, sizeof ssl); memset(&policy, 0, sizeof policy); memset(&verdict, 0, sizeof verdict);
    ssl.cbSize = sizeof ssl;
    ssl.dwAuthType = AUTHTYPE_SERVER;
    ssl.fdwChecks = name ? 0 : SECURITY_FLAG_IGNORE_CERT_CN_INVALID;
    ssl.pwszServerName = name;
    policy.cbSize = sizeof policy;
    policy.pvExtraPolicyPara = &ssl;
    verdict.cbSize = sizeof verdict;
    if (!CertVerifyCertificateChainPolicy(CERT_CHAIN_POLICY_SSL, chain, &policy, &verdict)) return GetLastError();
    return verdict.dwError;
}

/* the PC's CAs and the box's name, for an https url without a pin: what Schannel checks on
   Windows already (its automatic validation is on then), checked here again because wine's
   Schannel does not check it. The chain first, then the name: a host name through Windows'
   SSL policy, an IP address against the certificate's IP addresses (wine's policy matches
   DNS names only). */
static DWORD chain_error(PCCERT_CONTEXT cert, const char *host) {
    CERT_CHAIN_PARA chain_para;
    PCCERT_CHAIN_CONTEXT chain = NULL;
    LPSTR usage[] = {(LPSTR)szOID_PKIX_KP_SERVER_AUTH};
    DWORD error;
    memset(&chain_para, 0, sizeof chain_para);
    chain_para.cbSize = sizeof chain_para;
    chain_para.RequestedUsage.dwType = USAGE_MATCH_TYPE_OR;
    chain_para.RequestedUsage.Usage.cUsageIdentifier = 1;
    chain_para.RequestedUsage.Usage.rgpszUsageIdentifier = usage;
    if (!CertGetCertificateChain(NULL, cert, NULL, cert->hCertStore, &chain_para, 0, NULL, &chain))
        return GetLastError() ? GetLastError() : (DWORD)CERT_E_UNTRUSTEDROOT;
    /* any trust error of the chain itself, whatever the policy says: wine's SSL policy passes
       a chain that ends at a CA nobody installed (a partial chain), Windows' says CERT_E_CHAINING */
    DWORD status = chain->TrustStatus.dwErrorStatus;
    error = ssl_policy(chain, NULL);
    if (!error && status)
        error = status & CERT_TRUST_IS_PARTIAL_CHAIN ? (DWORD)CERT_E_CHAINING
              : status & CERT_TRUST_IS_UNTRUSTED_ROOT ? (DWORD)CERT_E_UNTRUSTEDROOT
              : status & CERT_TRUST_IS_NOT_TIME_VALID ? (DWORD)CERT_E_EXPIRED : (DWORD)TRUST_E_FAIL;
    if (!error) {
        unsigned char address[16];
        if (inet_pton(AF_INET, host, address) == 1 || inet_pton(AF_INET6, host, address) == 1) {
            if (!names_address(cert, host)) error = (DWORD)CERT_E_CN_NO_MATCH;
        } else {
            int n = MultiByteToWideChar(CP_UTF8, 0, host, -1, NULL, 0);
            WCHAR *whost = n > 0 ? malloc((size_t)n * sizeof(WCHAR)) : NULL;
            if (whost) MultiByteToWideChar(CP_UTF8, 0, host, -1, whost, n);
            error = whost ? ssl_policy(chain, whost) : (DWORD)CERT_E_CN_NO_MATCH;
            free(whost);
        }
    }
    CertFreeCertificateChain(chain);
    return error;
}

/* the certificate the handshake brought: its SHA-256 is the pin, or the PC's CAs vouch for it */
static http_result check_certificate(tls_t *t, const char *pin, const char *ini) {
    PCCERT_CONTEXT cert = NULL;
    unsigned char digest[32];
    char seen[96];
    int i;
    if (QueryContextAttributesA(&t->ctx, SECPKG_ATTR_REMOTE_CERT_CONTEXT, &cert) != SEC_E_OK || !cert)
        return failed(t, HTTP_UNTRUSTED, "the box at %.200s showed no certificate: nothing was sent", t->url);
    if (!sha256(cert->pbCertEncoded, cert->cbCertEncoded, digest)) {
        CertFreeCertificateContext(cert);
        return failed(t, HTTP_FAILED, "cannot compute SHA-256 (bcrypt)");
    }
    for (i = 0; i < 32; i++) snprintf(seen + 3 * i, 4, i < 31 ? "%02X:" : "%02X", digest[i]);
    if (pin[0]) {
        CertFreeCertificateContext(cert);
        if (strcmp(seen, pin))
            return failed(t, HTTP_UNTRUSTED, "the certificate at %.120s is not the pinned one (another box, or someone "
                          "in between); nothing was sent. Its SHA-256: %s; the pin: %s (fingerprint in %.200s)", t->url,
                          seen, pin, ini);
        return HTTP_OK;
    }
    DWORD error = chain_error(cert, t->host);
    CertFreeCertificateContext(cert);
    if (error)
        return failed(t, HTTP_UNTRUSTED, "the certificate at %.120s is not one this PC's CAs vouch for under the name "
                      "%.80s (0x%08lx); nothing was sent. Its SHA-256: %s. A box's own certificate needs its "
                      "fingerprint in the ini (fingerprint=, as scanbox tls show on the box says)", t->url, t->host,
                      (unsigned long)error, seen);
    return HTTP_OK;
}

static http_result send_request(tls_t *t, const char *request, size_t len) {
    SecPkgContext_StreamSizes sizes;
    if (QueryContextAttributesA(&t->ctx, SECPKG_ATTR_STREAM_SIZES, &sizes) != SEC_E_OK)
        return failed(t, HTTP_FAILED, "Schannel gave no record sizes");
    char *record = malloc(sizes.cbHeader + sizes.cbMaximumMessage + sizes.cbTrailer);
    if (!record) return failed(t, HTTP_FAILED, "out of memory");
    http_result r = HTTP_OK;
    while (len && r == HTTP_OK) {
        unsigned long chunk = len < sizes.cbMaximumMessage ? (unsigned long)len : sizes.cbMaximumMessage;
        memcpy(record + sizes.cbHeader, request, chunk);
        SecBuffer parts[4] = {{sizes.cbHeader, SECBUFFER_STREAM_HEADER, record},
                              {chunk, SECBUFFER_DATA, record + sizes.cbHeader},
                              {sizes.cbTrailer, SECBUFFER_STREAM_TRAILER, record + sizes.cbHeader + chunk},
                              {0, SECBUFFER_EMPTY, NULL}};
        SecBufferDesc desc = {SECBUFFER_VERSION, 4, parts};
        SECURITY_STATUS status = EncryptMessage(&t->ctx, 0, &desc, 0);
        if (status != SEC_E_OK) { r = failed(t, HTTP_FAILED, "Schannel could not encrypt (0x%08lx)", (unsigned long)status); break; }
        r = send_all(t, record, parts[0].cbBuffer + parts[1].cbBuffer + parts[2].cbBuffer);
        request += chunk;
        len -= chunk;
    }
    SecureZeroMemory(record, sizes.cbHeader + sizes.cbMaximumMessage + sizes.cbTrailer);
    free(record);
    return r;
}

/* ---- the answer: HTTP/1.1 status line, headers, a body by Content-Length, chunks or close ---- */

static const char *find_header(const char *head, size_t head_len, const char *name, size_t *value_len) {
    const char *p = memchr(head, '\n', head_len), *end = head + head_len;
    size_t n = strlen(name);
    while (p && ++p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        if ((size_t)(eol - p) > n && p[n] == ':' && !_strnicmp(p, name, n)) {
            const char *v = p + n + 1, *e = eol;
            while (v < e && (*v == ' ' || *v == '\t')) v++;
            while (e > v && (e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t')) e--;
            *value_len = (size_t)(e - v);
            return v;
        }
        p = eol;
    }
    return NULL;
}

/* 1: a whole answer (body copied to *body), 0: not yet, -1: not HTTP (why set) */
static int parse_answer(const char *data, size_t len, int closed, DWORD *status, buf_t *body, const char **why) {
    const char *head_end = NULL;
    size_t i, value_len;
    for (i = 0; i + 3 < len; i++)
        if (!memcmp(data + i, "\r\n\r\n", 4)) { head_end = data + i + 4; break; }
    if (!head_end) {
        if (closed || len > 65536) { *why = "an answer without a whole HTTP head"; return -1; }
        return 0;
    }
    size_t head_len = (size_t)(head_end - data);
    if (head_len < 12 || memcmp(data, "HTTP/1.", 7) || data[8] != ' ' || data[9] < '1' || data[9] > '5' ||
        data[10] < '0' || data[10] > '9' || data[11] < '0' || data[11] > '9') {
        *why = "an answer that is not HTTP/1.x";
        return -1;
    }
    *status = (DWORD)((data[9] - '0') * 100 + (data[10] - '0') * 10 + (data[11] - '0'));
    const char *p = head_end, *end = data + len;
    const char *coding = find_header(data, head_len, "Transfer-Encoding", &value_len);
    body->len = 0;
    if (coding && value_len == 7 && !_strnicmp(coding, "chunked", 7)) {
        for (;;) {
            const char *eol = memchr(p, '\n', (size_t)(end - p));
            if (!eol) return closed ? (*why = "chunks cut off", -1) : 0;
            char *after;
            unsigned long size = strtoul(p, &after, 16);
            if (after == p || size > MAX_ANSWER) { *why = "a bad chunk size"; return -1; }
            p = eol + 1;
            if (size == 0) break; /* trailers, if any, are not needed */
            if ((size_t)(end - p) < size + 2) return closed ? (*why = "chunks cut off", -1) : 0;
            if (p[size] != '\r' || p[size + 1] != '\n') { *why = "a chunk longer than its size"; return -1; }
            buf_add(body, p, size);
            p += size + 2;
            if (body->len > MAX_ANSWER) { *why = "an answer over 16 MB"; return -1; }
        }
        return 1;
    }
    const char *length = find_header(data, head_len, "Content-Length", &value_len);
    if (length) {
        char digits[24], *after;
        if (!value_len || value_len >= sizeof digits) { *why = "a bad Content-Length"; return -1; }
        memcpy(digits, length, value_len);
        digits[value_len] = 0;
        unsigned long long want = strtoull(digits, &after, 10);
        if (*after || want > MAX_ANSWER) { *why = "a bad Content-Length"; return -1; }
        if ((size_t)(end - p) < want) return closed ? (*why = "an answer cut off before its Content-Length", -1) : 0;
        buf_add(body, p, (size_t)want);
        return 1;
    }
    if (!closed) return 0; /* the body runs to the close */
    buf_add(body, p, (size_t)(end - p));
    return 1;
}

static http_result read_answer(tls_t *t, const char *pin, const char *ini, DWORD *status, buf_t *body) {
    buf_t plain = {0};
    http_result r = HTTP_OK;
    int closed = 0;
    const char *why = NULL;
    for (;;) {
        /* decrypt every whole record that is here */
        while (t->in_len && !closed) {
            SecBuffer parts[4] = {{(unsigned long)t->in_len, SECBUFFER_DATA, t->in},
                                  {0, SECBUFFER_EMPTY, NULL}, {0, SECBUFFER_EMPTY, NULL}, {0, SECBUFFER_EMPTY, NULL}};
            SecBufferDesc desc = {SECBUFFER_VERSION, 4, parts};
            int alert = (unsigned char)t->in[0] == 21; /* TLS 1.2 records name their type in clear */
            size_t before = plain.len;
            SECURITY_STATUS s = DecryptMessage(&t->ctx, &desc, 0, NULL);
            if (s == SEC_E_INCOMPLETE_MESSAGE) break; /* the rest of the record is still on its way */
            if (s != SEC_E_OK && s != SEC_I_RENEGOTIATE && s != SEC_I_CONTEXT_EXPIRED) {
                r = failed(t, HTTP_UNREACHABLE, "cannot decrypt the answer of the box at %.200s (0x%08lx)", t->url,
                           (unsigned long)s);
                goto done;
            }
            SecBuffer *extra = NULL;
            int i;
            for (i = 1; i < 4; i++) {
                if (parts[i].BufferType == SECBUFFER_DATA && parts[i].cbBuffer) buf_add(&plain, parts[i].pvBuffer, parts[i].cbBuffer);
                if (parts[i].BufferType == SECBUFFER_EXTRA && parts[i].cbBuffer) extra = &parts[i];
            }
            if (extra && extra->cbBuffer <= t->in_len) {
                memmove(t->in, t->in + t->in_len - extra->cbBuffer, extra->cbBuffer);
                t->in_len = extra->cbBuffer;
            } else {
                t->in_len = 0;
            }
            if (plain.failed || plain.len > MAX_ANSWER + 65536) {
                r = failed(t, HTTP_FAILED, "the box's answer is over 16 MB");
                goto done;
            }
            /* the box's close_notify: SEC_I_CONTEXT_EXPIRED on Windows, an alert that decrypts to
               nothing on wine (whose Schannel says SEC_E_OK) */
            if (s == SEC_I_CONTEXT_EXPIRED || (alert && plain.len == before)) closed = 1;
            if (s == SEC_I_RENEGOTIATE) {
                /* the box renegotiates: back into the handshake with what follows, and its
                   certificate checked again before anything else is read or sent */
                if ((r = handshake(t)) != HTTP_OK || (r = check_certificate(t, pin, ini)) != HTTP_OK) goto done;
            }
        }
        /* with the connection closed, an answer is whole or broken, never "not yet" */
        int whole = parse_answer(plain.data ? plain.data : "", plain.len, closed, status, body, &why);
        if (whole > 0) break;
        if (whole < 0) {
            r = failed(t, HTTP_UNREACHABLE, "the box at %.200s sent %s", t->url, why);
            goto done;
        }
        if ((r = receive(t, &closed)) != HTTP_OK) goto done;
    }
    if (body->failed) r = failed(t, HTTP_FAILED, "out of memory");
done:
    buf_free(&plain);
    return r;
}

/* a close_notify, as a polite client sends; the answer is already in hand, so failures here
   do not matter */
static void say_goodbye(tls_t *t) {
    DWORD type = SCHANNEL_SHUTDOWN;
    SecBuffer token[1] = {{sizeof type, SECBUFFER_TOKEN, &type}};
    SecBufferDesc desc = {SECBUFFER_VERSION, 1, token};
    if (ApplyControlToken(&t->ctx, &desc) != SEC_E_OK) return;
    SecBuffer out[1] = {{0, SECBUFFER_TOKEN, NULL}};
    SecBufferDesc out_desc = {SECBUFFER_VERSION, 1, out};
    unsigned long attributes = 0;
    SECURITY_STATUS status = InitializeSecurityContextA(&t->cred, &t->ctx, t->host, t->flags, 0, 0, NULL, 0, NULL,
                                                        &out_desc, &attributes, NULL);
    if ((status == SEC_E_OK || status == SEC_I_CONTEXT_EXPIRED) && out[0].pvBuffer && out[0].cbBuffer)
        send(t->s, out[0].pvBuffer, (int)out[0].cbBuffer, 0);
    if (out[0].pvBuffer) FreeContextBuffer(out[0].pvBuffer);
}

http_result https_post(const config_t *c, const WCHAR *whost, unsigned port, const char *path, const char *headers,
                       const char *body, size_t len, int timeout_s, char **answer, size_t *answer_len, DWORD *status,
                       char *error, size_t error_cap) {
    tls_t t;
    WSADATA wsa;
    buf_t request = {0}, content = {0};
    http_result r;
    char line[700];
    memset(&t, 0, sizeof t);
    t.s = INVALID_SOCKET;
    t.deadline = GetTickCount64() + (ULONGLONG)timeout_s * 1000;
    t.timeout_s = timeout_s;
    t.url = c->url;
    t.error = error;
    t.error_cap = error_cap;
    int n = WideCharToMultiByte(CP_UTF8, 0, whost, -1, NULL, 0, NULL, NULL);
    t.host = n > 0 ? malloc((size_t)n) : NULL;
    if (!t.host) return failed(&t, HTTP_FAILED, "out of memory");
    WideCharToMultiByte(CP_UTF8, 0, whost, -1, t.host, n, NULL, NULL);
    if (t.host[0] == '[') { /* [::1] */
        memmove(t.host, t.host + 1, strlen(t.host));
        char *close = strchr(t.host, ']');
        if (close) *close = 0;
    }
    if (WSAStartup(MAKEWORD(2, 2), &wsa)) { free(t.host); return failed(&t, HTTP_FAILED, "Winsock did not start"); }

    if ((r = connect_to(&t, port, timeout_s < 5 ? timeout_s : 5)) != HTTP_OK) goto done;
    SCHANNEL_CRED credentials;
    memset(&credentials, 0, sizeof credentials);
    credentials.dwVersion = SCHANNEL_CRED_VERSION;
    credentials.grbitEnabledProtocols = SP_PROT_TLS1_2_CLIENT; /* the box's floor; SCHANNEL_CRED has no TLS 1.3 */
    /* pinned: Schannel must not judge a self-signed certificate; the pin does, below, before
       anything is sent. Not pinned: Schannel checks the chain and the name (and so do we). */
    credentials.dwFlags = SCH_CRED_NO_DEFAULT_CREDS |
                          (c->fingerprint[0] ? SCH_CRED_MANUAL_CRED_VALIDATION | SCH_CRED_NO_SERVERNAME_CHECK
                                             : SCH_CRED_AUTO_CRED_VALIDATION);
    SECURITY_STATUS s = AcquireCredentialsHandleA(NULL, (LPSTR)UNISP_NAME_A, SECPKG_CRED_OUTBOUND, NULL, &credentials,
                                                  NULL, NULL, &t.cred, NULL);
    if (s != SEC_E_OK) { r = failed(&t, HTTP_FAILED, "Schannel has no TLS 1.2 client here (0x%08lx)", (unsigned long)s); goto done; }
    t.have_cred = 1;
    t.flags = ISC_REQ_SEQUENCE_DETECT | ISC_REQ_REPLAY_DETECT | ISC_REQ_CONFIDENTIALITY | ISC_REQ_ALLOCATE_MEMORY |
              ISC_REQ_STREAM | ISC_REQ_EXTENDED_ERROR | (c->fingerprint[0] ? ISC_REQ_MANUAL_CRED_VALIDATION : 0);
    {
        SecBuffer out[1] = {{0, SECBUFFER_TOKEN, NULL}};
        SecBufferDesc out_desc = {SECBUFFER_VERSION, 1, out};
        unsigned long attributes = 0;
        s = InitializeSecurityContextA(&t.cred, NULL, t.host, t.flags, 0, 0, NULL, 0, &t.ctx, &out_desc, &attributes,
                                       NULL);
        if (s != SEC_I_CONTINUE_NEEDED) {
            if (out[0].pvBuffer) FreeContextBuffer(out[0].pvBuffer);
            r = failed(&t, HTTP_FAILED, "Schannel would not start TLS (0x%08lx)", (unsigned long)s);
            goto done;
        }
        t.have_ctx = 1;
        r = out[0].cbBuffer ? send_all(&t, out[0].pvBuffer, out[0].cbBuffer) : HTTP_OK;
        FreeContextBuffer(out[0].pvBuffer);
        if (r != HTTP_OK) goto done;
    }
    if ((r = handshake(&t)) != HTTP_OK) goto done;
    /* the only gate: nothing of the request exists on the wire before this passes */
    if ((r = check_certificate(&t, c->fingerprint, c->ini)) != HTTP_OK) goto done;

    snprintf(line, sizeof line, "POST %s HTTP/1.1\r\nHost: %s%s%s:%u\r\nUser-Agent: scanbox-dll/1\r\n"
             "Content-Length: %lu\r\nConnection: close\r\n", path, strchr(t.host, ':') ? "[" : "", t.host,
             strchr(t.host, ':') ? "]" : "", port, (unsigned long)len);
    buf_str(&request, line);
    buf_str(&request, headers); /* Content-Type and Authorization, \r\n after each */
    buf_str(&request, "\r\n");
    buf_add(&request, body, len);
    if (request.failed) { r = failed(&t, HTTP_FAILED, "out of memory"); goto done; }
    r = send_request(&t, request.data, request.len);
    SecureZeroMemory(request.data, request.len); /* the token */
    if (r != HTTP_OK) goto done;
    if ((r = read_answer(&t, c->fingerprint, c->ini, status, &content)) != HTTP_OK) goto done;
    say_goodbye(&t);
    if (!content.data) buf_add(&content, "", 0);
    if (content.failed) { r = failed(&t, HTTP_FAILED, "out of memory"); goto done; }
    *answer = content.data;
    *answer_len = content.len;
    content.data = NULL;
done:
    buf_free(&content);
    buf_free(&request);
    if (t.have_ctx) DeleteSecurityContext(&t.ctx);
    if (t.have_cred) FreeCredentialsHandle(&t.cred);
    if (t.s != INVALID_SOCKET) closesocket(t.s);
    WSACleanup();
    free(t.in);
    free(t.host);
    return r;
}
