/* What both DLLs share: a small JSON tree (parse; write in scanbox's canonical form), GBK and
   UTF-8, the ini beside the DLL, one HTTP POST to the box (http:// through WinHTTP, https://
   through Schannel with the box's certificate pinned: https.c), and copying an answer into a
   caller's buffer without ever writing past it. */
#ifndef SCANBOX_COMMON_H
#define SCANBOX_COMMON_H
#include <stddef.h>
#include <windows.h>

/* ---- growable byte buffer ---- */
typedef struct { char *data; size_t len, cap; int failed; } buf_t;
void buf_add(buf_t *b, const char *s, size_t n);
void buf_str(buf_t *b, const char *s);
void buf_free(buf_t *b);

/* ---- JSON ---- */
typedef enum { J_NULL, J_FALSE, J_TRUE, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT } jtype;
typedef struct json json;
struct json {
    jtype type;
    char *text;   /* J_STRING: UTF-8 (len bytes, NUL-terminated); J_NUMBER: its literal */
    size_t len;
    json **items; /* J_ARRAY, J_OBJECT */
    char **keys;  /* J_OBJECT: UTF-8, NUL-terminated */
    size_t count;
};
/* NULL when text is not one JSON value; *error says why (static text) */
json *json_parse(const char *text, size_t len, const char **error);
void json_free(json *j);
json *json_get(const json *object, const char *key);
const char *json_str(const json *object, const char *key); /* the string member, or NULL */
json *json_new_string(const char *s, size_t len);
/* set (replace or add) a member; takes ownership of value */
void json_set(json *object, const char *key, json *value);
void json_remove(json *object, const char *key);
/* keys sorted by code point at every level, no whitespace, strings escaped as Python's
   json.dumps(ensure_ascii=False) escapes them. Returns 0 when a number is not an integer
   (the canonical form of a fraction is Python's, which this writer does not reproduce). */
int json_write(const json *j, buf_t *out, int canonical);

/* ---- text ---- */
/* malloc'd, NUL-terminated; NULL when the input is not valid in its encoding */
char *convert_text(const char *in, size_t len, UINT from_cp, UINT to_cp, size_t *out_len);
/* copy text (NUL-terminated) into dst of size cap; never past it. When it does not fit, the
   longest prefix that ends on a whole GBK character is written and 0 returned. */
int put_text(char *dst, size_t cap, const char *text, int utf8);

/* ---- configuration (the ini beside the DLL) ---- */
typedef struct {
    char url[512];        /* https://HOST:PORT (or http://) of the box */
    char fingerprint[96]; /* the box certificate's SHA-256 as AA:BB:... (upper case), or empty */
    char token[256];      /* bearer token (WSCallDLL.dll) */
    char app_key[256];    /* OneTrans2.dll: used when pInData carries none */
    int timeout_s;        /* a whole call, network included */
    int read_timeout_s;   /* how long a reading call waits for a scan */
    int out_size;         /* the caller's output buffer size */
    int msg_size;         /* the caller's message buffer size */
    int utf8;             /* callers speak UTF-8 instead of GBK */
    char ini[MAX_PATH];   /* the file read */
    char error[256];
} config_t;
/* 0 when no usable box address was found (error says why) */
int load_config(HMODULE module, const char *default_ini, config_t *config);

/* ---- HTTP ---- */
/* HTTP_UNTRUSTED: the certificate is not the pinned one (or, unpinned, not vouched for by the
   PC's CAs); nothing of the request was sent */
typedef enum { HTTP_OK = 0, HTTP_UNREACHABLE, HTTP_TIMEOUT, HTTP_BAD_URL, HTTP_FAILED, HTTP_UNTRUSTED } http_result;
/* POST body to url + path; the answer's body (malloc'd, NUL-terminated) and status */
http_result http_post(const config_t *config, const char *path, const char *content_type, const char *body,
                      size_t len, int timeout_s, char **answer, size_t *answer_len, DWORD *status, char *error,
                      size_t error_cap);
/* the https:// half of http_post (https.c); headers: "Name: value\r\n" lines */
http_result https_post(const config_t *config, const WCHAR *host, unsigned port, const char *path, const char *headers,
                       const char *body, size_t len, int timeout_s, char **answer, size_t *answer_len, DWORD *status,
                       char *error, size_t error_cap);
#endif
