// Call a scanbox from a .NET HIS (C#, .NET 6 or later: HttpClient and System.Text.Json).
//
//   var box = new ScanboxClient("https://10.1.2.3:7801", "the-his-token",
//                               "AB:CD:...:EF");  // the box's SHA-256 fingerprint, pinned
//   JsonElement result = await box.CallAsync("read_card", new { timeout_s = 60 });
//   string name = result.GetProperty("identity").GetProperty("name").GetString();
//
// Each call is one POST /rpc with the token as a bearer token (docs/api.md). A failed call
// throws ScanboxException with the box's stable Reason (TIMEOUT, QR_EXPIRED, UNAUTHORIZED, ...).
// read_card waits for the patient: give HttpClient a timeout longer than timeout_s.
//
// Beyond loopback and the USB cable (http://192.168.7.1:7801) the box speaks TLS with a
// certificate of its own. Pin its SHA-256 fingerprint (`scanbox tls show` on the box, `scanbox
// doctor`, the box's screen at start): the callback below accepts that one certificate and no
// other, whatever a CA says, and the token is only sent once it has. Without a fingerprint the
// system's CAs decide (a site that gave the box a certificate from its own CA).
//
// Not compiled in scanbox's CI (no .NET there); it uses only the framework's own classes.

using System;
using System.Net.Http;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Threading;
using System.Threading.Tasks;

public sealed class ScanboxException : Exception
{
    public int Code { get; }
    public string? Reason { get; }

    public ScanboxException(int code, string message, string? reason) : base(message)
    {
        Code = code;
        Reason = reason;
    }
}

public sealed class ScanboxClient : IDisposable
{
    private readonly HttpClient _http;
    private readonly Uri _rpc;
    private int _nextId;

    public ScanboxClient(string baseUrl, string token, string? fingerprint = null)
    {
        var handler = new HttpClientHandler();
        if (fingerprint != null)
        {
            byte[] pinned = ParseFingerprint(fingerprint);
            handler.ServerCertificateCustomValidationCallback = (request, certificate, chain, errors) =>
                certificate != null && CryptographicOperations.FixedTimeEquals(
                    SHA256.HashData(certificate.RawData), pinned);
        }
        _http = new HttpClient(handler) { Timeout = TimeSpan.FromSeconds(120) };
        _http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        _rpc = new Uri(new Uri(baseUrl.TrimEnd('/') + "/"), "rpc");
    }

    public async Task<JsonElement> CallAsync(string method, object? parameters = null,
                                             CancellationToken cancel = default)
    {
        var request = new
        {
            jsonrpc = "2.0",
            id = Interlocked.Increment(ref _nextId),
            method,
            @params = parameters ?? new { },
        };
        using var content = new StringContent(JsonSerializer.Serialize(request), Encoding.UTF8, "application/json");
        // 401, 403, 413 and 429 also carry a JSON-RPC error object: read the body whatever the status
        using var response = await _http.PostAsync(_rpc, content, cancel);
        string body = await response.Content.ReadAsStringAsync(cancel);
        using var document = JsonDocument.Parse(body);
        JsonElement root = document.RootElement;
        if (root.TryGetProperty("error", out JsonElement error))
        {
            string? reason = null;
            if (error.TryGetProperty("data", out JsonElement data) && data.ValueKind == JsonValueKind.Object &&
                data.TryGetProperty("reason", out JsonElement r))
            {
                reason = r.GetString();
            }
            throw new ScanboxException(error.GetProperty("code").GetInt32(),
                                       error.GetProperty("message").GetString() ?? "", reason);
        }
        return root.GetProperty("result").Clone();  // Clone: outlives the disposed document
    }

    // "AB:CD:..." (as scanbox prints it), "abcd..." or "AB CD ...": 32 bytes
    private static byte[] ParseFingerprint(string text)
    {
        string hex = text.Replace(":", "").Replace(" ", "");
        byte[] bytes = Convert.FromHexString(hex);
        if (bytes.Length != 32)
        {
            throw new ArgumentException("a SHA-256 fingerprint is 32 bytes, got " + bytes.Length, nameof(text));
        }
        return bytes;
    }

    public void Dispose() => _http.Dispose();
}

public static class Program
{
    // dotnet run -- http://127.0.0.1:7801 TOKEN
    // dotnet run -- https://10.1.2.3:7801 TOKEN AB:CD:...:EF
    public static async Task<int> Main(string[] args)
    {
        using var box = new ScanboxClient(args.Length > 0 ? args[0] : "http://127.0.0.1:7801",
                                          args.Length > 1 ? args[1] : "",
                                          args.Length > 2 ? args[2] : null);
        try
        {
            JsonElement status = await box.CallAsync("status");
            Console.WriteLine("box {0}, platform reachable: {1}", status.GetProperty("device_id").GetString(),
                              status.GetProperty("platform").GetProperty("reachable"));
            Console.WriteLine("请出示电子健康卡 (waiting up to 60 s)...");
            JsonElement result = await box.CallAsync("read_card", new { timeout_s = 60 });
            JsonElement verification = result.GetProperty("verification");
            if (verification.GetProperty("ok").GetBoolean())
            {
                JsonElement who = result.GetProperty("identity");
                Console.WriteLine("{0} {1}", who.GetProperty("name").GetString(), who.GetProperty("id_number").GetString());
            }
            else
            {
                Console.WriteLine("not verified: {0}", verification.GetProperty("reason").GetString());
            }
            return 0;
        }
        catch (ScanboxException e)
        {
            Console.Error.WriteLine("error {0} ({1}): {2}", e.Code, e.Reason, e.Message);
            return 1;
        }
        catch (HttpRequestException e)  // a certificate that is not the pinned one ends up here
        {
            Console.Error.WriteLine("cannot talk to the box: {0}", e.Message);
            return 1;
        }
    }
}
