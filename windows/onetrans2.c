/* OneTrans2.dll (spec 004): int __stdcall OneTrans(char *pInData, char *pOutData).

   The HIS passes the spec's pInData (GBK JSON, app_key inside). This DLL takes the key out (it
   never leaves this PC), encrypts `data` when enc_type is SM4, signs the request as the box
   requires (docs/api.md "OneTrans": HMAC-SM3 under a key derived from app_key), POSTs it to the
   box's /onetrans, checks that the answer is signed by the same key and carries this request's
   msgid, decrypts its data and writes pOutData (GBK JSON, at most out_size bytes, 8192 by
   default as the spec's String(8192)). One call at a time: a second concurrent call answers
   600001 as the spec says. Return 0 when pOutData holds a complete answer, -1 when the caller's
   buffer could not (pOutData then holds a short error if it fits). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include <bcrypt.h>
#include "sm.h"

#define DEFAULT_OUT 8192

static HMODULE self;
static volatile LONG busy;

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved) {
    (void)reserved;
    if (reason == DLL_PROCESS_ATTACH) { self = instance; DisableThreadLibraryCalls(instance); }
    return TRUE;
}

static void now_ms(char out[18]) {
    SYSTEMTIME t;
    GetLocalTime(&t);
    snprintf(out, 18, "%04u%02u%02u%02u%02u%02u%03u", t.wYear, t.wMonth, t.wDay, t.wHour, t.wMinute, t.wSecond,
             t.wMilliseconds);
}

/* pOutData text (UTF-8 JSON) into the caller's buffer in its encoding */
static int deliver(char *out, size_t cap, const char *utf8_text, int utf8) {
    size_t len;
    char *text = utf8 ? NULL : convert_text(utf8_text, strlen(utf8_text), CP_UTF8, 936, &len);
    int fits = put_text(out, cap, text ? text : utf8_text, utf8 || !text);
    free(text);
    return fits;
}

/* a pOutData made here, not by the box: 9xxxxx codes (docs/windows.md) */
static int local_answer(char *out, size_t cap, int utf8, const char *code, const char *message) {
    json *answer = json_parse("{}", 2, NULL);
    char stamp[18];
    buf_t text = {0};
    now_ms(stamp);
    json_set(answer, "code", json_new_string(code, strlen(code)));
    json_set(answer, "data", json_parse("{}", 2, NULL));
    json_set(answer, "err_msg", json_new_string(message, strlen(message)));
    json_set(answer, "inf_refmsgid", json_new_string("", 0));
    json_set(answer, "refmsg_time", json_new_string(stamp, 17));
    json_set(answer, "respond_time", json_new_string(stamp, 17));
    json_write(answer, &text, 0);
    json_free(answer);
    int fits = text.data && deliver(out, cap, text.data, utf8);
    if (!fits) {
        /* not even this fits: the shortest answer that says so, or nothing */
        const char *tiny = "{\"code\":\"900006\",\"err_msg\":\"pOutData too small\"}";
        put_text(out, cap, strlen(tiny) < cap ? tiny : "", 1);
    }
    buf_free(&text);
    return fits ? 0 : -1;
}

static int random_bytes(unsigned char *out, ULONG n) {
    return BCRYPT_SUCCESS(BCryptGenRandom(NULL, out, n, BCRYPT_USE_SYSTEM_PREFERRED_RNG));
}

static void derive(const char *app_key, const char *label, unsigned char out[32]) {
    hmac_sm3((const uint8_t *)app_key, strlen(app_key), (const uint8_t *)label, strlen(label), out);
}

/* sign: the lowercase hex HMAC-SM3 of the canonical form of message without its sign */
static int signature_of(json *message, const unsigned char mac[32], char hex[65]) {
    buf_t canonical = {0};
    unsigned char digest[32];
    json *saved = json_get(message, "sign");
    int ok;
    if (saved) {
        /* sign is never part of what is signed: write the others */
        json copy = *message;
        json **items = malloc(message->count * sizeof *items);
        char **keys = malloc(message->count * sizeof *keys);
        size_t i, n = 0;
        if (!items || !keys) { free(items); free(keys); return 0; }
        for (i = 0; i < message->count; i++)
            if (strcmp(message->keys[i], "sign")) { items[n] = message->items[i]; keys[n++] = message->keys[i]; }
        copy.items = items; copy.keys = keys; copy.count = n;
        ok = json_write(&copy, &canonical, 1);
        free(items); free(keys);
    } else {
        ok = json_write(message, &canonical, 1);
    }
    if (!ok || canonical.failed) { buf_free(&canonical); return 0; }
    hmac_sm3(mac, 32, (const uint8_t *)canonical.data, canonical.len, digest);
    to_hex(digest, 32, hex);
    buf_free(&canonical);
    return 1;
}

static int onetrans(char *in, char *out, size_t cap, const config_t *config) {
    int utf8 = config->utf8, rc;
    size_t len;
    const char *why = NULL;
    char key[256], error[700], hex[65], message_text[400];
    unsigned char mac[32], sm4[32];
    json *request = NULL, *answer = NULL;
    buf_t body = {0}, result = {0};
    char *reply = NULL, *text = NULL;
    DWORD status;

    text = utf8 ? convert_text(in, strlen(in), CP_UTF8, CP_UTF8, &len) : convert_text(in, strlen(in), 936, CP_UTF8, &len);
    if (!text) { rc = local_answer(out, cap, utf8, "900002", utf8 ? "pInData is not UTF-8 text" : "pInData is not GBK text"); goto done; }
    request = json_parse(text, len, &why);
    if (!request || request->type != J_OBJECT) {
        snprintf(message_text, sizeof message_text, "pInData is not a JSON object (%s)", why ? why : "another value");
        rc = local_answer(out, cap, utf8, "900002", message_text);
        goto done;
    }
    /* the key: from pInData (the spec's app_key / appKey), else the ini; it goes no further */
    const char *given = json_str(request, "app_key") ? json_str(request, "app_key") : json_str(request, "appKey");
    if (given && strlen(given) < sizeof key) strcpy(key, given);
    else if (config->app_key[0]) strcpy(key, config->app_key);
    else { rc = local_answer(out, cap, utf8, "900002", "pInData has no app_key (and the ini has no app_key)"); goto done; }
    json_remove(request, "app_key");
    json_remove(request, "appKey");
    json_remove(request, "sign");
    derive(key, "scanbox onetrans mac v1", mac);
    derive(key, "scanbox onetrans sm4 v1", sm4);
    SecureZeroMemory(key, sizeof key);

    const char *enc_type = json_str(request, "enc_type");
    json *data = json_get(request, "data");
    if (enc_type && !strcmp(enc_type, "SM4") && data && data->type != J_STRING) {
        buf_t plain = {0};
        unsigned char iv[16];
        if (!json_write(data, &plain, 1) || plain.failed || !random_bytes(iv, 16)) {
            buf_free(&plain);
            rc = local_answer(out, cap, utf8, "900002", "data holds a number with a fraction or exponent: "
                              "send amounts as strings, as the spec's fields are");
            goto done;
        }
        unsigned char *sealed = malloc(16 + plain.len + 16);
        char *b64 = sealed ? malloc(4 * ((16 + plain.len + 16 + 2) / 3) + 1) : NULL;
        if (!b64) { free(sealed); buf_free(&plain); rc = local_answer(out, cap, utf8, "900002", "out of memory"); goto done; }
        memcpy(sealed, iv, 16);
        size_t n = sm4_cbc_encrypt(sm4, iv, (const uint8_t *)plain.data, plain.len, sealed + 16);
        size_t b = base64_encode(sealed, 16 + n, b64);
        json_set(request, "data", json_new_string(b64, b));
        free(sealed); free(b64); buf_free(&plain);
    }
    if (!signature_of(request, mac, hex)) {
        rc = local_answer(out, cap, utf8, "900002", "pInData holds a number with a fraction or exponent: send "
                          "amounts as strings, as the spec's fields are");
        goto done;
    }
    json_set(request, "sign", json_new_string(hex, 64));
    json_write(request, &body, 1);
    if (body.failed) { rc = local_answer(out, cap, utf8, "900002", "out of memory"); goto done; }

    http_result sent = http_post(config, "/onetrans", "application/json; charset=utf-8", body.data, body.len,
                                 config->read_timeout_s + config->timeout_s, &reply, &len, &status, error, sizeof error);
    if (sent != HTTP_OK) {
        rc = local_answer(out, cap, utf8, sent == HTTP_TIMEOUT ? "900004" : sent == HTTP_UNTRUSTED ? "900007" : "900003",
                          error);
        goto done;
    }
    answer = status == 200 ? json_parse(reply, len, &why) : NULL;
    if (!answer || answer->type != J_OBJECT || !json_str(answer, "code")) {
        snprintf(message_text, sizeof message_text, "the box answered HTTP %lu without a pOutData: is %s a scanbox "
                 "with HTTP on?", status, config->url);
        rc = local_answer(out, cap, utf8, "900005", message_text);
        goto done;
    }
    const char *sign = json_str(answer, "sign");
    if (!sign) {
        /* unsigned: the box could not authenticate the request (its code says why); never a success */
        if (!strcmp(json_str(answer, "code"), "000000")) {
            rc = local_answer(out, cap, utf8, "900005", "an unsigned success answer: not from the box, refused");
            goto done;
        }
    } else {
        char expected[65];
        const char *msgid = json_str(request, "msgid"), *echoed = json_str(answer, "msgid");
        if (!signature_of(answer, mac, expected) || strcmp(expected, sign)) {
            rc = local_answer(out, cap, utf8, "900005", "the answer's signature is wrong: not from a box that has this "
                              "app's key");
            goto done;
        }
        if (!msgid || !echoed || strcmp(msgid, echoed)) {
            rc = local_answer(out, cap, utf8, "900005", "the answer is for another msgid: refused");
            goto done;
        }
        const char *sealed = json_str(answer, "data");
        const char *answer_enc = json_str(answer, "enc_type");
        if (answer_enc && !strcmp(answer_enc, "SM4") && sealed) {
            size_t slen = strlen(sealed);
            unsigned char *raw = malloc(slen);
            long n = raw ? base64_decode(sealed, slen, raw) : -1;
            long plain = n >= 32 ? sm4_cbc_decrypt(sm4, raw, raw + 16, (size_t)n - 16, raw + 16) : -1;
            json *opened = plain >= 0 ? json_parse((const char *)raw + 16, (size_t)plain, NULL) : NULL;
            free(raw);
            if (!opened) { rc = local_answer(out, cap, utf8, "900005", "the answer's data does not decrypt"); goto done; }
            json_set(answer, "data", opened);
        }
        json_remove(answer, "sign"); /* it covered the encrypted data; the HIS gets the plain one */
    }
    json_write(answer, &result, 0);
    if (result.failed) { rc = local_answer(out, cap, utf8, "900002", "out of memory"); goto done; }
    if (deliver(out, cap, result.data, utf8)) rc = 0;
    else {
        snprintf(message_text, sizeof message_text, "the answer (%u bytes) does not fit pOutData (%u bytes; "
                 "out_size in the ini)", (unsigned)result.len, (unsigned)cap);
        local_answer(out, cap, utf8, "900006", message_text);
        rc = -1;
    }
done:
    SecureZeroMemory(mac, sizeof mac);
    SecureZeroMemory(sm4, sizeof sm4);
    json_free(request); json_free(answer);
    buf_free(&body); buf_free(&result);
    free(reply); free(text);
    return rc;
}

int __stdcall OneTrans(char *pInData, char *pOutData) {
    config_t config;
    int rc;
    if (!pOutData) return -1;
    if (!load_config(self, "OneTrans2.ini", &config)) {
        return local_answer(pOutData, DEFAULT_OUT, 0, "900001", config.error);
    }
    size_t cap = config.out_size ? (size_t)config.out_size : DEFAULT_OUT;
    if (!pInData) return local_answer(pOutData, cap, config.utf8, "900002", "pInData is NULL");
    if (InterlockedCompareExchange(&busy, 1, 0)) {
        return local_answer(pOutData, cap, config.utf8, "600001",
                            "接口业务不支持并发调用: another OneTrans call is in progress in this program");
    }
    rc = onetrans(pInData, pOutData, cap, &config);
    InterlockedExchange(&busy, 0);
    return rc;
}
