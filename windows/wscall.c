/* WSCallDLL.dll (spec 001, DLL调用接口规范): the platform calls WSC_* and the card-reading calls
   ReadPeopleInfo_V2 / ReadCardInfo_V2 / ShowForm_V2, forwarded to a scanbox's HIS API (HTTP
   POST /rpc with a bearer token): platform.call for the WSC_* operations (the box holds the
   platform's credentials and authKey), read_card for the reading calls (the box's next scan).

   Text is GBK (encoding = UTF-8 in the ini for UTF-8 callers). Output buffers have no size
   argument in the spec: the DLL writes at most out_size bytes to an output (5120 by default,
   the spec's VC++ example) and msg_size to a message (1024); a longer answer is cut at a whole
   character and the call returns -16 saying so. Return codes: docs/windows.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"

#define DEFAULT_OUT 5120
#define OK_READ 0
#define OK_PLATFORM 10000
#define E_FORMAT (-15)
#define E_UNKNOWN (-16)
#define E_NO_CARD (-24)
#define E_CONNECTION (-33)
#define E_CONFIG (-100)
#define E_WEBSERVICE (-101)

static HMODULE self;

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved) {
    (void)reserved;
    if (reason == DLL_PROCESS_ATTACH) { self = instance; DisableThreadLibraryCalls(instance); }
    return TRUE;
}

typedef struct {
    config_t config;
    char *out, *msg;
    size_t out_cap, msg_cap;
} call_t;

/* write UTF-8 text to a caller's buffer in the caller's encoding; 0 when it was cut */
static int emit(const call_t *c, char *dst, size_t cap, const char *utf8_text) {
    size_t len;
    if (!dst) return 1;
    char *text = c->config.utf8 ? NULL : convert_text(utf8_text, strlen(utf8_text), CP_UTF8, 936, &len);
    int fits = put_text(dst, cap, text ? text : utf8_text, c->config.utf8 || !text);
    free(text);
    return fits;
}

static int fail(const call_t *c, int code, const char *fmt, const char *detail) {
    char text[1200];
    snprintf(text, sizeof text, fmt, detail ? detail : "");
    emit(c, c->msg, c->msg_cap, text);
    if (c->out && c->out_cap) c->out[0] = 0;
    return code;
}

static int begin(call_t *c, char *out, char *msg) {
    memset(c, 0, sizeof *c);
    c->out = out; c->msg = msg;
    if (msg) msg[0] = 0;
    if (!load_config(self, "WSCallConfig.ini", &c->config)) {
        c->msg_cap = 1024; c->out_cap = DEFAULT_OUT;
        return 0;
    }
    c->out_cap = c->config.out_size ? (size_t)c->config.out_size : DEFAULT_OUT;
    c->msg_cap = (size_t)c->config.msg_size;
    return 1;
}

/* ---- JSON-RPC to the box ---------------------------------------------------------------- */

/* the result of method(params) or a return code (msg written) */
static int rpc(call_t *c, const char *method, json *params, int timeout_s, json **result) {
    buf_t body = {0};
    char *reply = NULL, error[700];
    size_t len;
    DWORD status;
    const char *why = NULL;
    *result = NULL;
    buf_str(&body, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"");
    buf_str(&body, method);
    buf_str(&body, "\",\"params\":");
    if (params) json_write(params, &body, 0); else buf_str(&body, "{}");
    buf_str(&body, "}");
    if (body.failed) { buf_free(&body); return fail(c, E_UNKNOWN, "out of memory%s", NULL); }
    http_result sent = http_post(&c->config, "/rpc", "application/json", body.data, body.len, timeout_s, &reply, &len,
                                 &status, error, sizeof error);
    buf_free(&body);
    if (sent != HTTP_OK) return fail(c, sent == HTTP_BAD_URL ? E_CONFIG : E_CONNECTION, "设备连接异常: %s", error);
    json *answer = json_parse(reply, len, &why);
    free(reply);
    if (status == 401) { json_free(answer); return fail(c, E_CONFIG, "读取配置文件失败: the box refused the token (token in %s)", c->config.ini); }
    if (!answer || answer->type != J_OBJECT) {
        json_free(answer);
        snprintf(error, sizeof error, "HTTP %lu from %.200s: is it a scanbox with HTTP on?", status, c->config.url);
        return fail(c, E_CONNECTION, "设备连接异常: %s", error);
    }
    json *err = json_get(answer, "error");
    if (err) {
        json *data = json_get(err, "data");
        const char *reason = json_str(data, "reason"), *text = json_str(err, "message");
        const char *platform_code = json_str(data, "platform_code");
        char detail[700];
        int code = E_UNKNOWN;
        snprintf(detail, sizeof detail, "%s (%s)", text ? text : "error", reason ? reason : "no reason");
        if (reason && !strcmp(reason, "TIMEOUT")) code = E_NO_CARD;
        else if (reason && !strcmp(reason, "UNAUTHORIZED")) code = E_CONFIG;
        else if (reason && !strcmp(reason, "BAD_REQUEST")) code = E_FORMAT;
        else if (reason && !strcmp(reason, "PLATFORM_UNAVAILABLE")) code = E_WEBSERVICE;
        else if (platform_code && atoi(platform_code) > 0) code = atoi(platform_code);
        json_free(answer);
        if (code == E_NO_CARD) return fail(c, code, "未寻到卡,[没放卡或卡型无效],请重试! %s", detail);
        if (code == E_CONFIG) return fail(c, code, "读取配置文件失败: %s", detail);
        if (code == E_WEBSERVICE) return fail(c, code, "调用Java WebService失败: %s", detail);
        return fail(c, code, "%s", detail);
    }
    json *res = json_get(answer, "result");
    if (!res) { json_free(answer); return fail(c, E_CONNECTION, "设备连接异常: %s", "an answer without a result"); }
    /* detach the result from the answer */
    size_t i;
    for (i = 0; i < answer->count; i++)
        if (answer->items[i] == res) answer->items[i] = json_parse("null", 4, NULL);
    json_free(answer);
    *result = res;
    return 0;
}

/* ---- XML ----------------------------------------------------------------------------- */

static void xml_text(buf_t *out, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '<': buf_str(out, "&lt;"); break;
        case '>': buf_str(out, "&gt;"); break;
        case '&': buf_str(out, "&amp;"); break;
        case '"': buf_str(out, "&quot;"); break;
        default: buf_add(out, s, 1);
        }
    }
}

static void xml_value(buf_t *out, const char *name, const json *v) {
    size_t i;
    if (v->type == J_ARRAY) {
        for (i = 0; i < v->count; i++) xml_value(out, name, v->items[i]);
        return;
    }
    buf_str(out, "<"); buf_str(out, name); buf_str(out, ">");
    if (v->type == J_OBJECT) for (i = 0; i < v->count; i++) xml_value(out, v->keys[i], v->items[i]);
    else if (v->type == J_STRING || v->type == J_NUMBER) xml_text(out, v->text);
    else if (v->type == J_TRUE || v->type == J_FALSE) buf_str(out, v->type == J_TRUE ? "true" : "false");
    buf_str(out, "</"); buf_str(out, name); buf_str(out, ">");
}

typedef struct { const char *p, *end; const char *error; int depth; } xml_parser;

static void xml_skip(xml_parser *x) {
    for (;;) {
        while (x->p < x->end && (*x->p == ' ' || *x->p == '\t' || *x->p == '\r' || *x->p == '\n')) x->p++;
        if (x->end - x->p >= 4 && !memcmp(x->p, "<!--", 4)) {
            const char *close = strstr(x->p + 4, "-->");
            /* the spec's own examples leave some comments unclosed ("<!--Optional:出生地>") */
            const char *gt = memchr(x->p + 4, '>', (size_t)(x->end - x->p - 4));
            x->p = close && close < x->end ? close + 3 : gt ? gt + 1 : x->end;
        } else if (x->end - x->p >= 2 && (!memcmp(x->p, "<?", 2) || !memcmp(x->p, "<!", 2))) {
            const char *gt = memchr(x->p, '>', (size_t)(x->end - x->p));
            x->p = gt ? gt + 1 : x->end;
        } else return;
    }
}

static void xml_unescape(buf_t *out, const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (s[i] == '&') {
            const char *semi = memchr(s + i, ';', n - i);
            size_t len = semi ? (size_t)(semi - (s + i)) + 1 : 0;
            if (len == 4 && !memcmp(s + i, "&lt;", 4)) { buf_str(out, "<"); i += 4; continue; }
            if (len == 4 && !memcmp(s + i, "&gt;", 4)) { buf_str(out, ">"); i += 4; continue; }
            if (len == 5 && !memcmp(s + i, "&amp;", 5)) { buf_str(out, "&"); i += 5; continue; }
            if (len == 6 && !memcmp(s + i, "&quot;", 6)) { buf_str(out, "\""); i += 6; continue; }
            if (len == 6 && !memcmp(s + i, "&apos;", 6)) { buf_str(out, "'"); i += 6; continue; }
        }
        buf_add(out, s + i, 1);
        i++;
    }
}

/* one element: name (namespace prefix dropped) and its value (an object of children, or text) */
static json *xml_element(xml_parser *x, char *name, size_t name_cap) {
    xml_skip(x);
    if (x->p >= x->end || *x->p != '<' || ++x->depth > 32) { x->error = "not an XML element"; return NULL; }
    const char *start = ++x->p;
    while (x->p < x->end && !strchr(" \t\r\n/>", *x->p)) x->p++;
    const char *colon = memchr(start, ':', (size_t)(x->p - start));
    const char *local = colon ? colon + 1 : start;
    size_t nlen = (size_t)(x->p - local);
    if (!nlen || nlen >= name_cap) { x->error = "an element name that is empty or too long"; return NULL; }
    memcpy(name, local, nlen); name[nlen] = 0;
    const char *gt = memchr(x->p, '>', (size_t)(x->end - x->p));
    if (!gt) { x->error = "an unclosed tag"; return NULL; }
    int empty = gt[-1] == '/';
    x->p = gt + 1;
    if (empty) { x->depth--; return json_new_string("", 0); }
    json *object = NULL;
    buf_t text = {0};
    for (;;) {
        const char *before = x->p;
        xml_skip(x);
        if (x->p >= x->end) { x->error = "an element without its end tag"; break; }
        if (x->end - x->p >= 2 && !memcmp(x->p, "</", 2)) {
            const char *close = memchr(x->p, '>', (size_t)(x->end - x->p));
            if (!close) { x->error = "an unclosed end tag"; break; }
            x->p = close + 1;
            x->depth--;
            if (object) { buf_free(&text); return object; }
            json *s = json_new_string(text.data ? text.data : "", text.len);
            buf_free(&text);
            return s;
        }
        if (*x->p == '<') {
            char child[64];
            json *value = xml_element(x, child, sizeof child);
            if (!value) break;
            if (!object) object = json_parse("{}", 2, NULL);
            if (!json_get(object, child)) json_set(object, child, value); else json_free(value);
            continue;
        }
        /* text up to the next tag (whitespace before it kept) */
        const char *lt = memchr(before, '<', (size_t)(x->end - before));
        if (!lt) { x->error = "text without an end tag"; break; }
        xml_unescape(&text, before, (size_t)(lt - before));
        x->p = lt;
    }
    json_free(object);
    buf_free(&text);
    return NULL;
}

static json *detach(json *parent, size_t i) {
    json *item = parent->items[i];
    parent->items[i] = json_parse("null", 4, NULL);
    return item;
}

/* szInput -> params: the spec's whole SOAP envelope, one wrapping element (the operation's), or
   the bare parameters side by side; orgCode and authKey are the box's to add */
static json *xml_params(const char *xml, size_t len, const char **error) {
    xml_parser x = {xml, xml + len, NULL, 0};
    json *top = json_parse("{}", 2, NULL), *root;
    for (;;) {
        char name[64];
        xml_skip(&x);
        if (x.p >= x.end) break;
        json *element = xml_element(&x, name, sizeof name);
        if (!element) { json_free(top); *error = x.error; return NULL; }
        if (!json_get(top, name)) json_set(top, name, element); else json_free(element);
    }
    if (!top->count) { json_free(top); *error = "no XML element"; return NULL; }
    if (top->count == 1 && top->items[0]->type == J_OBJECT) {
        int envelope = !strcmp(top->keys[0], "Envelope");
        root = detach(top, 0);
        json_free(top);
        if (envelope) {
            json *body = json_get(root, "Body");
            if (!body || body->type != J_OBJECT || !body->count || body->items[0]->type != J_OBJECT) {
                json_free(root); *error = "a SOAP envelope without an operation"; return NULL;
            }
            json *op = detach(body, 0);
            json_free(root);
            root = op;
        }
    } else {
        root = top;
    }
    json_remove(root, "orgCode");
    json_remove(root, "authKey");
    return root;
}

/* ---- the WSC_* platform calls -------------------------------------------------------- */

static int platform_call(const char *operation, const char *input, char *msg, char *output) {
    call_t c;
    const char *why = NULL;
    size_t len;
    if (!begin(&c, output, msg)) return fail(&c, E_CONFIG, "读取配置文件失败: %s", c.config.error);
    if (!input) return fail(&c, E_FORMAT, "传入数据格式无效: %s", "szInput is NULL");
    char *text = c.config.utf8 ? convert_text(input, strlen(input), CP_UTF8, CP_UTF8, &len)
                               : convert_text(input, strlen(input), 936, CP_UTF8, &len);
    if (!text) return fail(&c, E_FORMAT, "传入数据格式无效: %s", "szInput is not GBK text");
    json *params = xml_params(text, len, &why);
    free(text);
    if (!params) return fail(&c, E_FORMAT, "传入数据格式无效: szInput is not XML (%s)", why);
    json *call = json_parse("{}", 2, NULL), *result = NULL;
    json_set(call, "operation", json_new_string(operation, strlen(operation)));
    json_set(call, "params", params);
    int rc = rpc(&c, "platform.call", call, c.config.timeout_s, &result);
    json_free(call);
    if (rc) return rc;
    const char *code = json_str(result, "resultCode"), *message = json_str(result, "message");
    buf_t xml = {0};
    buf_str(&xml, "<?xml version=\"1.0\" encoding=\"");
    buf_str(&xml, c.config.utf8 ? "UTF-8" : "GBK");
    buf_str(&xml, "\"?><soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body><ns2:");
    buf_str(&xml, operation);
    buf_str(&xml, "Response xmlns:ns2=\"http://www.wondersgroup.com/card\"><return>");
    buf_str(&xml, "<message>"); xml_text(&xml, message ? message : ""); buf_str(&xml, "</message>");
    buf_str(&xml, "<resultCode>"); xml_text(&xml, code ? code : ""); buf_str(&xml, "</resultCode>");
    json *data = json_get(result, "data");
    size_t i;
    for (i = 0; data && data->type == J_OBJECT && i < data->count; i++) xml_value(&xml, data->keys[i], data->items[i]);
    buf_str(&xml, "</return></ns2:");
    buf_str(&xml, operation);
    buf_str(&xml, "Response></soap:Body></soap:Envelope>");
    rc = code && atoi(code) > 0 ? atoi(code) : E_UNKNOWN;
    char refusal[600];
    snprintf(refusal, sizeof refusal, "%s", message ? message : "the platform refused");
    json_free(result); /* code and message pointed into it */
    if (xml.failed) { buf_free(&xml); return fail(&c, E_UNKNOWN, "out of memory%s", NULL); }
    if (!emit(&c, output, c.out_cap, xml.data)) {
        char detail[200];
        snprintf(detail, sizeof detail, "the answer (%u bytes) does not fit szOutput (out_size %u in %s)",
                 (unsigned)xml.len, (unsigned)c.out_cap, c.config.ini);
        emit(&c, msg, c.msg_cap, detail);
        buf_free(&xml);
        return E_UNKNOWN;
    }
    buf_free(&xml);
    if (rc != OK_PLATFORM) emit(&c, msg, c.msg_cap, refusal);
    return rc;
}

/* The box gets and renews the platform's authKey itself (and keeps the password): this checks
   that the box answers and hands the HIS a key it may pass back, which the DLL ignores. */
int __stdcall WSC_getAuthKey(const char *szEndPoint, const char *szInput, char *szMsg, char *szOutput, char *szReserve) {
    call_t c;
    json *result = NULL;
    (void)szEndPoint; (void)szInput; (void)szReserve;
    if (!begin(&c, szOutput, szMsg)) return fail(&c, E_CONFIG, "读取配置文件失败: %s", c.config.error);
    int rc = rpc(&c, "status", NULL, c.config.timeout_s, &result);
    if (rc) return rc;
    const char *device = json_str(result, "device_id");
    buf_t xml = {0};
    buf_str(&xml, "<?xml version=\"1.0\" encoding=\"");
    buf_str(&xml, c.config.utf8 ? "UTF-8" : "GBK");
    buf_str(&xml, "\"?><soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body>"
                  "<ns2:getAuthKeyResponse xmlns:ns2=\"http://www.wondersgroup.com/card\"><return><message>操作成功"
                  "</message><resultCode>10000</resultCode><authKey>scanbox:");
    xml_text(&xml, device ? device : "box");
    buf_str(&xml, "</authKey></return></ns2:getAuthKeyResponse></soap:Body></soap:Envelope>");
    json_free(result);
    int fits = !xml.failed && emit(&c, szOutput, c.out_cap, xml.data);
    buf_free(&xml);
    if (!fits) return fail(&c, E_UNKNOWN, "the answer does not fit szOutput (out_size in %s)", c.config.ini);
    return OK_PLATFORM;
}

int __stdcall WSC_syncCardInfo(const char *szEndPoint, const char *szInput, char *szMsg, char *szOutput, char *szReserve) {
    (void)szEndPoint; (void)szReserve;
    return platform_call("syncCardInfo", szInput, szMsg, szOutput);
}

int __stdcall WSC_virIdCardVerify(const char *szEndPoint, const char *szInput, char *szMsg, char *szOutput, char *szReserve) {
    (void)szEndPoint; (void)szReserve;
    return platform_call("virIdCardVerify", szInput, szMsg, szOutput);
}

int __stdcall WSC_updateCardInfo(const char *szEndPoint, const char *szInput, char *szMsg, char *szOutput, char *szReserve) {
    (void)szEndPoint; (void)szReserve;
    return platform_call("updateCardInfo", szInput, szMsg, szOutput);
}

int __stdcall WSC_downQr(const char *szEndPoint, const char *szInput, char *szMsg, char *szOutput, char *szReserve) {
    (void)szEndPoint; (void)szReserve;
    return platform_call("downQr", szInput, szMsg, szOutput);
}

/* ---- the reading calls --------------------------------------------------------------- */

static const char *str_or_empty(const json *o, const char *key) {
    const char *s = json_str(o, key);
    return s ? s : "";
}

static void tag(buf_t *xml, const char *name, const char *value) {
    buf_str(xml, "<"); buf_str(xml, name); buf_str(xml, ">");
    xml_text(xml, value);
    buf_str(xml, "</"); buf_str(xml, name); buf_str(xml, ">");
}

static int read_identity(char *OutputData, char *ErrMsg, int card) {
    call_t c;
    json *result = NULL;
    if (!begin(&c, OutputData, ErrMsg)) return fail(&c, E_CONFIG, "读取配置文件失败: %s", c.config.error);
    char params[80];
    snprintf(params, sizeof params, "{\"timeout_s\":%d,\"verify\":true}", c.config.read_timeout_s);
    json *p = json_parse(params, strlen(params), NULL);
    int rc = rpc(&c, "read_card", p, c.config.read_timeout_s + c.config.timeout_s, &result);
    json_free(p);
    if (rc) return rc;
    json *verification = json_get(result, "verification"), *identity = json_get(result, "identity");
    json *scan = json_get(result, "scan");
    json *ok = json_get(verification, "ok");
    if (verification && (!ok || ok->type != J_TRUE)) {
        const char *platform_code = json_str(verification, "platform_code");
        char detail[600];
        snprintf(detail, sizeof detail, "%s: %s", str_or_empty(verification, "reason"),
                 str_or_empty(verification, "message"));
        rc = platform_code && atoi(platform_code) > 0 ? atoi(platform_code) : E_UNKNOWN;
        json_free(result);
        return fail(&c, rc, "%s", detail);
    }
    if (!identity || identity->type != J_OBJECT) {
        json_free(result);
        return fail(&c, E_UNKNOWN, "the scan carries no identity%s", NULL);
    }
    buf_t xml = {0};
    buf_str(&xml, "<?xml version=\"1.0\" encoding=\"");
    buf_str(&xml, c.config.utf8 ? "UTF-8" : "GBK");
    buf_str(&xml, card ? "\"?><CardInfo>" : "\"?><PeopleInfo>");
    tag(&xml, "xm", str_or_empty(identity, "name"));
    tag(&xml, "xb", str_or_empty(identity, "sex"));
    tag(&xml, "mzdm", str_or_empty(identity, "nation"));
    tag(&xml, "csrq", str_or_empty(identity, "birthday"));
    tag(&xml, "zjlx", str_or_empty(identity, "id_type"));
    tag(&xml, "zjhm", str_or_empty(identity, "id_number"));
    tag(&xml, "brdh", str_or_empty(identity, "phone"));
    tag(&xml, "dz", str_or_empty(identity, "address"));
    tag(&xml, "empi", str_or_empty(identity, "main_index"));
    tag(&xml, "vuid", str_or_empty(identity, "ecard_id"));
    const char *kind = str_or_empty(scan, "kind");
    if (card) {
        /* 卡类型: 3 电子健康卡 (a QR), 1 居民健康卡 (the card), 身份证 and 社保卡 as the box read them */
        tag(&xml, "klx", !strcmp(kind, "qr") ? "3" : !strcmp(kind, "health_card") ? "1" : !strcmp(kind, "id_card")
                          ? "id_card" : kind);
        tag(&xml, "kh", str_or_empty(identity, "ecard_id"));
        tag(&xml, "kzt", str_or_empty(identity, "card_status"));
    }
    tag(&xml, "kind", kind);
    tag(&xml, "source", str_or_empty(scan, "source"));
    buf_str(&xml, card ? "</CardInfo>" : "</PeopleInfo>");
    json_free(result);
    int fits = !xml.failed && emit(&c, OutputData, c.out_cap, xml.data);
    size_t need = xml.len;
    buf_free(&xml);
    if (!fits) {
        char detail[200];
        snprintf(detail, sizeof detail, "the answer (%u bytes) does not fit OutputData (out_size %u in %s)",
                 (unsigned)need, (unsigned)c.out_cap, c.config.ini);
        emit(&c, ErrMsg, c.msg_cap, detail);
        return E_UNKNOWN;
    }
    emit(&c, ErrMsg, c.msg_cap, "成功");
    return OK_READ;
}

int __stdcall ReadPeopleInfo_V2(char *OutputData, char *ErrMsg, char *szReserve) {
    (void)szReserve;
    return read_identity(OutputData, ErrMsg, 0);
}

int __stdcall ReadCardInfo_V2(char *OutputData, char *ErrMsg, char *szReserve) {
    (void)szReserve;
    return read_identity(OutputData, ErrMsg, 1);
}

/* The vendor DLL showed its own settings form; the box has none on the PC. Nothing to show. */
int __stdcall ShowForm_V2(void) {
    return 0;
}
