#include "common.h"
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <winhttp.h>

/* ---- buffer --------------------------------------------------------------------------- */

void buf_add(buf_t *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) { b->failed = 1; return; }
        b->data = grown; b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

void buf_str(buf_t *b, const char *s) { buf_add(b, s, strlen(s)); }

void buf_free(buf_t *b) { free(b->data); b->data = NULL; b->len = b->cap = 0; }

/* ---- JSON parse ------------------------------------------------------------------------- */

#define MAX_DEPTH 64

typedef struct { const char *p, *end; const char *error; int depth; } parser;

static void skip_ws(parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

static json *new_node(jtype type) {
    json *j = calloc(1, sizeof *j);
    if (j) j->type = type;
    return j;
}

static int hex4(const char *p, unsigned *out) {
    unsigned v = 0;
    int i;
    for (i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static void utf8_put(buf_t *b, unsigned cp) {
    char t[4];
    if (cp < 0x80) { t[0] = (char)cp; buf_add(b, t, 1); }
    else if (cp < 0x800) { t[0] = (char)(0xc0 | (cp >> 6)); t[1] = (char)(0x80 | (cp & 63)); buf_add(b, t, 2); }
    else if (cp < 0x10000) {
        t[0] = (char)(0xe0 | (cp >> 12)); t[1] = (char)(0x80 | ((cp >> 6) & 63)); t[2] = (char)(0x80 | (cp & 63));
        buf_add(b, t, 3);
    } else {
        t[0] = (char)(0xf0 | (cp >> 18)); t[1] = (char)(0x80 | ((cp >> 12) & 63));
        t[2] = (char)(0x80 | ((cp >> 6) & 63)); t[3] = (char)(0x80 | (cp & 63));
        buf_add(b, t, 4);
    }
}

static char *parse_string(parser *ps, size_t *len) {
    buf_t b = {0};
    ps->p++; /* the opening quote */
    while (ps->p < ps->end && *ps->p != '"') {
        unsigned char c = (unsigned char)*ps->p;
        if (c < 0x20) { ps->error = "a control character inside a string"; buf_free(&b); return NULL; }
        if (c != '\\') { buf_add(&b, ps->p++, 1); continue; }
        if (ps->end - ps->p < 2) break;
        char e = ps->p[1];
        ps->p += 2;
        switch (e) {
        case '"': buf_add(&b, "\"", 1); break;
        case '\\': buf_add(&b, "\\", 1); break;
        case '/': buf_add(&b, "/", 1); break;
        case 'b': buf_add(&b, "\b", 1); break;
        case 'f': buf_add(&b, "\f", 1); break;
        case 'n': buf_add(&b, "\n", 1); break;
        case 'r': buf_add(&b, "\r", 1); break;
        case 't': buf_add(&b, "\t", 1); break;
        case 'u': {
            unsigned cp, low;
            if (ps->end - ps->p < 4 || !hex4(ps->p, &cp)) { ps->error = "a bad \\u escape"; buf_free(&b); return NULL; }
            ps->p += 4;
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (ps->end - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u' || !hex4(ps->p + 2, &low) ||
                    low < 0xdc00 || low >= 0xe000) {
                    ps->error = "a lone surrogate in a \\u escape"; buf_free(&b); return NULL;
                }
                ps->p += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
            } else if (cp >= 0xdc00 && cp < 0xe000) {
                ps->error = "a lone surrogate in a \\u escape"; buf_free(&b); return NULL;
            }
            utf8_put(&b, cp);
            break;
        }
        default: ps->error = "a bad escape in a string"; buf_free(&b); return NULL;
        }
    }
    if (ps->p >= ps->end) { ps->error = "a string without its closing quote"; buf_free(&b); return NULL; }
    ps->p++;
    if (!b.data) buf_add(&b, "", 0);
    if (b.failed) { ps->error = "out of memory"; buf_free(&b); return NULL; }
    *len = b.len;
    return b.data;
}

static json *parse_value(parser *ps);

static int add_item(json *j, char *key, json *item) {
    json **items = realloc(j->items, (j->count + 1) * sizeof *items);
    if (!items) return 0;
    j->items = items;
    if (j->type == J_OBJECT) {
        char **keys = realloc(j->keys, (j->count + 1) * sizeof *keys);
        if (!keys) return 0;
        j->keys = keys;
        j->keys[j->count] = key;
    }
    j->items[j->count++] = item;
    return 1;
}

static json *parse_container(parser *ps, jtype type) {
    char close = type == J_OBJECT ? '}' : ']';
    json *j = new_node(type);
    if (!j) { ps->error = "out of memory"; return NULL; }
    if (++ps->depth > MAX_DEPTH) { ps->error = "nested too deeply"; json_free(j); return NULL; }
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) { ps->p++; ps->depth--; return j; }
    for (;;) {
        char *key = NULL;
        size_t klen;
        skip_ws(ps);
        if (type == J_OBJECT) {
            if (ps->p >= ps->end || *ps->p != '"') { ps->error = "an object key that is not a string"; break; }
            if (!(key = parse_string(ps, &klen))) break;
            if (strlen(key) != klen || json_get(j, key)) {
                ps->error = strlen(key) != klen ? "a NUL in a key" : "a key given twice";
                free(key); break;
            }
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') { ps->error = "no ':' after a key"; free(key); break; }
            ps->p++;
        }
        json *item = parse_value(ps);
        if (!item) { free(key); break; }
        if (!add_item(j, key, item)) { ps->error = "out of memory"; free(key); json_free(item); break; }
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        if (ps->p < ps->end && *ps->p == close) { ps->p++; ps->depth--; return j; }
        ps->error = type == J_OBJECT ? "no ',' or '}' in an object" : "no ',' or ']' in an array";
        break;
    }
    json_free(j);
    return NULL;
}

static json *parse_value(parser *ps) {
    skip_ws(ps);
    if (ps->p >= ps->end) { ps->error = "the text ends where a value should be"; return NULL; }
    char c = *ps->p;
    if (c == '{') return parse_container(ps, J_OBJECT);
    if (c == '[') return parse_container(ps, J_ARRAY);
    if (c == '"') {
        size_t len;
        char *s = parse_string(ps, &len);
        if (!s) return NULL;
        json *j = new_node(J_STRING);
        if (!j) { free(s); ps->error = "out of memory"; return NULL; }
        j->text = s; j->len = len;
        return j;
    }
    static const struct { const char *word; jtype type; } WORDS[] = {{"null", J_NULL}, {"true", J_TRUE}, {"false", J_FALSE}};
    size_t i;
    for (i = 0; i < 3; i++) {
        size_t n = strlen(WORDS[i].word);
        if ((size_t)(ps->end - ps->p) >= n && !memcmp(ps->p, WORDS[i].word, n)) {
            ps->p += n;
            return new_node(WORDS[i].type);
        }
    }
    /* a number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
    const char *start = ps->p;
    if (ps->p < ps->end && *ps->p == '-') ps->p++;
    if (ps->p < ps->end && *ps->p == '0') ps->p++;
    else if (ps->p < ps->end && *ps->p >= '1' && *ps->p <= '9') while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
    else { ps->error = "not a JSON value (NaN and Infinity are not JSON)"; return NULL; }
    if (ps->p < ps->end && *ps->p == '.') {
        ps->p++;
        if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { ps->error = "a bad number"; return NULL; }
        while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
    }
    if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
        ps->p++;
        if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
        if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { ps->error = "a bad number"; return NULL; }
        while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
    }
    json *j = new_node(J_NUMBER);
    if (!j || !(j->text = malloc((size_t)(ps->p - start) + 1))) { free(j); ps->error = "out of memory"; return NULL; }
    memcpy(j->text, start, (size_t)(ps->p - start));
    j->len = (size_t)(ps->p - start);
    j->text[j->len] = 0;
    return j;
}

json *json_parse(const char *text, size_t len, const char **error) {
    parser ps = {text, text + len, NULL, 0};
    json *j = parse_value(&ps);
    if (j) {
        skip_ws(&ps);
        if (ps.p != ps.end) { json_free(j); j = NULL; ps.error = "text after the JSON value"; }
    }
    if (!j && error) *error = ps.error ? ps.error : "not JSON";
    return j;
}

void json_free(json *j) {
    size_t i;
    if (!j) return;
    for (i = 0; i < j->count; i++) {
        json_free(j->items[i]);
        if (j->keys) free(j->keys[i]);
    }
    free(j->items); free(j->keys); free(j->text); free(j);
}

json *json_get(const json *object, const char *key) {
    size_t i;
    if (!object || object->type != J_OBJECT) return NULL;
    for (i = 0; i < object->count; i++)
        if (!strcmp(object->keys[i], key)) return object->items[i];
    return NULL;
}

const char *json_str(const json *object, const char *key) {
    json *j = json_get(object, key);
    return j && j->type == J_STRING ? j->text : NULL;
}

json *json_new_string(const char *s, size_t len) {
    json *j = new_node(J_STRING);
    if (!j) return NULL;
    if (!(j->text = malloc(len + 1))) { free(j); return NULL; }
    memcpy(j->text, s, len);
    j->text[len] = 0;
    j->len = len;
    return j;
}

void json_remove(json *object, const char *key) {
    size_t i;
    for (i = 0; object && object->type == J_OBJECT && i < object->count; i++) {
        if (strcmp(object->keys[i], key)) continue;
        json_free(object->items[i]);
        free(object->keys[i]);
        memmove(object->items + i, object->items + i + 1, (object->count - i - 1) * sizeof *object->items);
        memmove(object->keys + i, object->keys + i + 1, (object->count - i - 1) * sizeof *object->keys);
        object->count--;
        return;
    }
}

void json_set(json *object, const char *key, json *value) {
    char *k;
    json_remove(object, key);
    if (!value || !(k = malloc(strlen(key) + 1))) { json_free(value); return; }
    strcpy(k, key);
    if (!add_item(object, k, value)) { free(k); json_free(value); }
}

/* ---- JSON write ------------------------------------------------------------------------- */

static void write_string(buf_t *out, const char *s, size_t len) {
    size_t i;
    buf_add(out, "\"", 1);
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        switch (c) {
        case '"': buf_add(out, "\\\"", 2); break;
        case '\\': buf_add(out, "\\\\", 2); break;
        case '\n': buf_add(out, "\\n", 2); break;
        case '\r': buf_add(out, "\\r", 2); break;
        case '\t': buf_add(out, "\\t", 2); break;
        case '\b': buf_add(out, "\\b", 2); break;
        case '\f': buf_add(out, "\\f", 2); break;
        default:
            if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); buf_add(out, esc, 6); }
            else buf_add(out, (const char *)&s[i], 1);
        }
    }
    buf_add(out, "\"", 1);
}

static int is_integer(const char *t) {
    return !strpbrk(t, ".eE");
}

int json_write(const json *j, buf_t *out, int canonical) {
    size_t i, k;
    switch (j->type) {
    case J_NULL: buf_str(out, "null"); return 1;
    case J_TRUE: buf_str(out, "true"); return 1;
    case J_FALSE: buf_str(out, "false"); return 1;
    case J_NUMBER:
        if (canonical && !is_integer(j->text)) return 0;
        buf_str(out, strcmp(j->text, "-0") ? j->text : "0");
        return 1;
    case J_STRING: write_string(out, j->text, j->len); return 1;
    case J_ARRAY:
        buf_add(out, "[", 1);
        for (i = 0; i < j->count; i++) {
            if (i) buf_add(out, ",", 1);
            if (!json_write(j->items[i], out, canonical)) return 0;
        }
        buf_add(out, "]", 1);
        return 1;
    case J_OBJECT: {
        /* members in code point order: UTF-8 byte order is code point order */
        size_t *order = malloc((j->count + 1) * sizeof *order);
        if (!order) { out->failed = 1; return 1; }
        for (i = 0; i < j->count; i++) order[i] = i;
        for (i = 1; canonical && i < j->count; i++)
            for (k = i; k > 0 && strcmp(j->keys[order[k - 1]], j->keys[order[k]]) > 0; k--) {
                size_t t = order[k]; order[k] = order[k - 1]; order[k - 1] = t;
            }
        buf_add(out, "{", 1);
        for (i = 0; i < j->count; i++) {
            if (i) buf_add(out, ",", 1);
            write_string(out, j->keys[order[i]], strlen(j->keys[order[i]]));
            buf_add(out, ":", 1);
            if (!json_write(j->items[order[i]], out, canonical)) { free(order); return 0; }
        }
        buf_add(out, "}", 1);
        free(order);
        return 1;
    }
    }
    return 1;
}

/* ---- text ------------------------------------------------------------------------------- */

char *convert_text(const char *in, size_t len, UINT from_cp, UINT to_cp, size_t *out_len) {
    if (len == 0) {
        char *empty = calloc(1, 1);
        if (out_len) *out_len = 0;
        return empty;
    }
    if (len > 0x7fffffff / 4) return NULL;
    int wide = MultiByteToWideChar(from_cp, MB_ERR_INVALID_CHARS, in, (int)len, NULL, 0);
    if (wide <= 0) return NULL;
    WCHAR *w = malloc((size_t)wide * sizeof(WCHAR));
    if (!w) return NULL;
    MultiByteToWideChar(from_cp, MB_ERR_INVALID_CHARS, in, (int)len, w, wide);
    int n = WideCharToMultiByte(to_cp, 0, w, wide, NULL, 0, NULL, NULL);
    char *out = n > 0 ? malloc((size_t)n + 1) : NULL;
    if (out) {
        WideCharToMultiByte(to_cp, 0, w, wide, out, n, NULL, NULL);
        out[n] = 0;
        if (out_len) *out_len = (size_t)n;
    }
    free(w);
    return out;
}

int put_text(char *dst, size_t cap, const char *text, int utf8) {
    size_t len = strlen(text), i = 0;
    if (!dst || cap == 0) return 0;
    if (len < cap) { memcpy(dst, text, len + 1); return 1; }
    /* the longest prefix of whole characters that leaves room for the NUL */
    while (i < len) {
        unsigned char c = (unsigned char)text[i];
        size_t size = 1;
        if (utf8) size = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
        else if (c >= 0x81 && c <= 0xfe) size = 2;
        if (i + size > cap - 1) break;
        i += size;
    }
    memcpy(dst, text, i);
    dst[i] = 0;
    return 0;
}

/* ---- configuration ---------------------------------------------------------------------- */

static int ini_string(const char *file, const char *section, const char *key, char *out, DWORD cap) {
    char value[1024];
    DWORD n = GetPrivateProfileStringA(section, key, "\x01", value, sizeof value, file);
    if (n == 1 && value[0] == '\x01') return 0;
    /* trim */
    char *s = value;
    while (*s == ' ' || *s == '\t') s++;
    n = (DWORD)strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r')) s[--n] = 0;
    if (!n || n >= cap) return 0;
    memcpy(out, s, n + 1);
    return 1;
}

static int ini_int(const char *file, const char *key, int fallback, int low, int high) {
    char value[32];
    if (!ini_string(file, "SCANBOX", key, value, sizeof value)) return fallback;
    char *end;
    long v = strtol(value, &end, 10);
    if (*end || v < low || v > high) return fallback;
    return (int)v;
}

/* AA:BB:... (any case), or the 64 hex digits without colons, into AA:BB:...; 0 when it is neither */
static int normal_fingerprint(const char *text, char out[96]) {
    size_t len = strlen(text), i, step = len == 64 ? 2 : 3;
    if (len != 64 && len != 95) return 0;
    for (i = 0; i < 32; i++) {
        const char *pair = text + i * step;
        if (!isxdigit((unsigned char)pair[0]) || !isxdigit((unsigned char)pair[1])) return 0;
        if (step == 3 && i < 31 && pair[2] != ':') return 0;
        out[3 * i] = (char)toupper((unsigned char)pair[0]);
        out[3 * i + 1] = (char)toupper((unsigned char)pair[1]);
        out[3 * i + 2] = i < 31 ? ':' : 0;
    }
    return 1;
}

int load_config(HMODULE module, const char *default_ini, config_t *c) {
    char dir[MAX_PATH], files[2][MAX_PATH], pin[256] = "";
    int f;
    memset(c, 0, sizeof *c);
    c->timeout_s = 10;
    c->read_timeout_s = 60;
    c->out_size = 0;
    c->msg_size = 1024;
    DWORD n = GetModuleFileNameA(module, dir, sizeof dir);
    if (n == 0 || n >= sizeof dir) { snprintf(c->error, sizeof c->error, "cannot find the DLL's folder"); return 0; }
    char *slash = strrchr(dir, '\\');
    if (slash) slash[1] = 0; else dir[0] = 0;
    snprintf(files[0], MAX_PATH, "%sscanbox.ini", dir);
    snprintf(files[1], MAX_PATH, "%s%s", dir, default_ini);
    /* [SCANBOX] in scanbox.ini, then [SCANBOX] in the DLL's own ini, then its [WEBSERVICE] url/authKey */
    for (f = 1; f >= 0; f--) {
        const char *file = files[f];
        if (GetFileAttributesA(file) == INVALID_FILE_ATTRIBUTES) continue;
        if (!c->ini[0] || f == 0) snprintf(c->ini, sizeof c->ini, "%s", file);
        ini_string(file, "SCANBOX", "url", c->url, sizeof c->url);
        ini_string(file, "SCANBOX", "token", c->token, sizeof c->token);
        ini_string(file, "SCANBOX", "app_key", c->app_key, sizeof c->app_key);
        ini_string(file, "SCANBOX", "fingerprint", pin, sizeof pin);
        c->timeout_s = ini_int(file, "timeout_s", c->timeout_s, 1, 3600);
        c->read_timeout_s = ini_int(file, "read_timeout_s", c->read_timeout_s, 1, 3600);
        c->out_size = ini_int(file, "out_size", c->out_size, 16, 1 << 24);
        c->msg_size = ini_int(file, "msg_size", c->msg_size, 16, 1 << 24);
        char enc[16];
        if (ini_string(file, "SCANBOX", "encoding", enc, sizeof enc)) c->utf8 = !_stricmp(enc, "UTF-8");
    }
    if (!c->url[0]) ini_string(files[1], "WEBSERVICE", "url", c->url, sizeof c->url);
    if (!c->token[0]) ini_string(files[1], "WEBSERVICE", "authKey", c->token, sizeof c->token);
    if (!c->ini[0]) {
        snprintf(c->error, sizeof c->error, "no scanbox.ini or %s beside the DLL (%s)", default_ini, dir);
        return 0;
    }
    int https = !_strnicmp(c->url, "https://", 8);
    if (!https && _strnicmp(c->url, "http://", 7)) {
        snprintf(c->error, sizeof c->error, "%s: url must be the box's https://HOST:PORT (or http:// on the same PC or "
                 "the USB link) (it is \"%.60s\")", c->ini, c->url);
        return 0;
    }
    if (pin[0] && !normal_fingerprint(pin, c->fingerprint)) {
        snprintf(c->error, sizeof c->error, "%s: fingerprint must be the box certificate's SHA-256 as 32 hex pairs "
                 "AA:BB:... (scanbox tls show on the box) (it is \"%.100s\")", c->ini, pin);
        return 0;
    }
    if (c->fingerprint[0] && !https) {
        snprintf(c->error, sizeof c->error, "%s: fingerprint is for an https:// url; url is \"%.60s\"", c->ini, c->url);
        return 0;
    }
    return 1;
}

/* ---- HTTP ------------------------------------------------------------------------------- */

static WCHAR *widen(const char *s) {
    int n = MultiByteToWideChar(CP_UTF8, 0, s, -1, NULL, 0);
    WCHAR *w = n > 0 ? malloc((size_t)n * sizeof(WCHAR)) : NULL;
    if (w) MultiByteToWideChar(CP_UTF8, 0, s, -1, w, n);
    return w;
}

http_result http_post(const config_t *c, const char *path, const char *content_type, const char *body, size_t len,
                      int timeout_s, char **answer, size_t *answer_len, DWORD *status, char *error, size_t error_cap) {
    http_result result = HTTP_FAILED;
    HINTERNET session = NULL, connection = NULL, request = NULL;
    WCHAR host[256], *url = widen(c->url), *wpath = widen(path), *headers = NULL;
    URL_COMPONENTS parts;
    buf_t in = {0};
    char header_text[600];
    *answer = NULL; *answer_len = 0; *status = 0;
    error[0] = 0;
    if (!url || !wpath) { snprintf(error, error_cap, "out of memory"); goto done; }
    memset(&parts, 0, sizeof parts);
    parts.dwStructSize = sizeof parts;
    parts.lpszHostName = host;
    parts.dwHostNameLength = sizeof host / sizeof host[0];
    parts.dwUrlPathLength = (DWORD)-1;
    if (!WinHttpCrackUrl(url, 0, 0, &parts) || (parts.nScheme != INTERNET_SCHEME_HTTP &&
                                                 parts.nScheme != INTERNET_SCHEME_HTTPS) || !host[0]) {
        snprintf(error, error_cap, "the box's url \"%.100s\" is not https://HOST:PORT or http://HOST:PORT", c->url);
        result = HTTP_BAD_URL;
        goto done;
    }
    snprintf(header_text, sizeof header_text, "Content-Type: %s\r\n%s%s%s", content_type,
             c->token[0] && !strcmp(path, "/rpc") ? "Authorization: Bearer " : "",
             c->token[0] && !strcmp(path, "/rpc") ? c->token : "",
             c->token[0] && !strcmp(path, "/rpc") ? "\r\n" : "");
    if (parts.nScheme == INTERNET_SCHEME_HTTPS) {
        result = https_post(c, host, parts.nPort, path, header_text, body, len, timeout_s, answer, answer_len, status,
                            error, error_cap);
        goto done;
    }
    session = WinHttpOpen(L"scanbox-dll/1", WINHTTP_ACCESS_TYPE_NO_PROXY, WINHTTP_NO_PROXY_NAME,
                          WINHTTP_NO_PROXY_BYPASS, 0);
    if (!session) { snprintf(error, error_cap, "WinHttpOpen failed (%lu)", GetLastError()); goto done; }
    int ms = timeout_s * 1000, connect_ms = ms < 5000 ? ms : 5000;
    WinHttpSetTimeouts(session, connect_ms, connect_ms, ms, ms);
    connection = WinHttpConnect(session, host, parts.nPort, 0);
    if (!connection) { snprintf(error, error_cap, "WinHttpConnect failed (%lu)", GetLastError()); goto done; }
    request = WinHttpOpenRequest(connection, L"POST", wpath, NULL, WINHTTP_NO_REFERER, WINHTTP_DEFAULT_ACCEPT_TYPES, 0);
    if (!request) { snprintf(error, error_cap, "WinHttpOpenRequest failed (%lu)", GetLastError()); goto done; }
    headers = widen(header_text);
    if (!headers) goto done;
    if (!WinHttpSendRequest(request, headers, (DWORD)-1L, (LPVOID)body, (DWORD)len, (DWORD)len, 0) ||
        !WinHttpReceiveResponse(request, NULL)) {
        DWORD e = GetLastError();
        result = e == ERROR_WINHTTP_TIMEOUT ? HTTP_TIMEOUT : HTTP_UNREACHABLE;
        if (e == ERROR_WINHTTP_TIMEOUT) snprintf(error, error_cap, "the box did not answer within %d s (%.200s)", timeout_s, c->url);
        else snprintf(error, error_cap, "cannot reach the box at %.200s (WinHTTP error %lu)", c->url, e);
        goto done;
    }
    DWORD code = 0, size = sizeof code;
    WinHttpQueryHeaders(request, WINHTTP_QUERY_STATUS_CODE | WINHTTP_QUERY_FLAG_NUMBER, WINHTTP_HEADER_NAME_BY_INDEX,
                        &code, &size, WINHTTP_NO_HEADER_INDEX);
    *status = code;
    for (;;) {
        DWORD available = 0, got = 0;
        char chunk[8192];
        if (!WinHttpQueryDataAvailable(request, &available)) {
            DWORD e = GetLastError();
            result = e == ERROR_WINHTTP_TIMEOUT ? HTTP_TIMEOUT : HTTP_UNREACHABLE;
            snprintf(error, error_cap, "the box's answer was cut off (WinHTTP error %lu)", e);
            goto done;
        }
        if (!available) break;
        if (!WinHttpReadData(request, chunk, available < sizeof chunk ? available : sizeof chunk, &got) || !got) break;
        buf_add(&in, chunk, got);
        if (in.len > (16u << 20)) { snprintf(error, error_cap, "the box's answer is over 16 MB"); goto done; }
    }
    if (in.failed) { snprintf(error, error_cap, "out of memory"); goto done; }
    if (!in.data) buf_add(&in, "", 0);
    *answer = in.data; *answer_len = in.len;
    in.data = NULL;
    result = HTTP_OK;
done:
    SecureZeroMemory(header_text, sizeof header_text); /* the token */
    buf_free(&in);
    free(url); free(wpath); free(headers);
    if (request) WinHttpCloseHandle(request);
    if (connection) WinHttpCloseHandle(connection);
    if (session) WinHttpCloseHandle(session);
    return result;
}
