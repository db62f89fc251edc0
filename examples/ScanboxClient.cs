// Call a scanbox from a .NET HIS in C#. One file, the framework's own classes only, that builds
// on .NET Framework 4.7.1 or later (a WinForms HIS; Mono too) and on .NET 6 or later.
//
//   var box = new ScanboxClient("https://10.1.2.3:7801", "the-his-token",
//                               "AB:CD:...:EF");  // the box's SHA-256 fingerprint, pinned
//   XElement result = await box.CallAsync("read_card",
//                                         new Dictionary<string, object> { { "timeout_s", 60 } });
//   string name = (string)result.Element("identity").Element("name");
//
// Each call is one POST /rpc with the token as a bearer token (docs/api.md). A failed call
// throws ScanboxException with the box's stable Reason (TIMEOUT, QR_EXPIRED, UNAUTHORIZED, ...).
// read_card waits for the patient: the client's timeout (120 s unless given) must be longer
// than timeout_s.
//
// Beyond loopback and the USB cable (http://192.168.7.1:7801) the box speaks TLS with a
// certificate of its own. Pin its SHA-256 fingerprint (`scanbox tls show` on the box, `scanbox
// doctor`, the box's screen at start): the callback below accepts that one certificate and no
// other, whatever a CA says, and the token is only sent once it has. Without a fingerprint the
// system's CAs decide (a site that gave the box a certificate from its own CA). Pinning needs
// HttpClientHandler.ServerCertificateCustomValidationCallback: .NET Framework 4.7.1 or later.
//
// JSON goes through JsonReaderWriterFactory (System.Runtime.Serialization.Json), the one JSON
// reader and writer that .NET Framework and .NET 6+ both have (System.Text.Json is not in .NET
// Framework, JavaScriptSerializer is not in .NET 6). It maps JSON onto XML, so a result is an
// XElement: an object's members are its child elements by name, an array's are <item> elements,
// and each has type="string", "number", "boolean", "null", "object" or "array". Cast for values:
// (string), (int), (long), (bool), (decimal). A JSON null is an element with type="null" whose
// value is "" (ScanboxClient.IsNull). A member whose name is not an XML name, such as a source
// called "hid:front" in status, is an <item item="hid:front"> element. Parameters are a
// dictionary of strings, numbers, booleans, null, nested dictionaries and lists.
//
// Build it:
//   .NET Framework, with the csc.exe every Windows has (it speaks C# 5, which is all this uses):
//     %WINDIR%\Microsoft.NET\Framework64\v4.0.30319\csc.exe /r:System.Net.Http.dll
//         /r:System.Runtime.Serialization.dll /r:System.Xml.Linq.dll ScanboxClient.cs
//   Mono (Debian: mono-mcs, libmono-system-net-http4.0-cil,
//         libmono-system-runtime-serialization4.0-cil, libmono-system-xml-linq4.0-cil):
//     mcs -r:System.Net.Http.dll -r:System.Runtime.Serialization.dll -r:System.Xml.Linq.dll ScanboxClient.cs
//     mono ScanboxClient.exe https://10.1.2.3:7801 TOKEN AB:CD:...:EF
//   .NET 6+: `dotnet new console`, this file in place of Program.cs, then
//     dotnet run -- https://10.1.2.3:7801 TOKEN AB:CD:...:EF
//   (with <Nullable>enable</Nullable> in the project, expect nullable warnings: this is C# 5).
// scanbox's tests build it with mcs at C# 5 and run it with Mono against a box over TLS
// (tests/api/test_csharp_example.py); the .NET 6 build is not tried there (Debian has no .NET).

using System;
using System.Collections;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Net;
using System.Net.Http;
using System.Net.Http.Headers;
using System.Runtime.Serialization.Json;
using System.Security.Cryptography;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using System.Xml;
using System.Xml.Linq;

public sealed class ScanboxException : Exception
{
    public int Code { get; private set; }
    public string Reason { get; private set; }    // null when the box gave none
    public XElement ErrorData { get; private set; }  // error.data: reason, platform_code, platform_message

    public ScanboxException(int code, string message, string reason, XElement errorData) : base(message)
    {
        Code = code;
        Reason = reason;
        ErrorData = errorData;
    }
}

public sealed class ScanboxClient : IDisposable
{
    private readonly HttpClient _http;
    private readonly Uri _rpc;
    private int _nextId;
    // the fingerprint of a certificate the pin refused, by the request it was refused for
    private readonly ConcurrentDictionary<HttpRequestMessage, string> _refused =
        new ConcurrentDictionary<HttpRequestMessage, string>();

    public ScanboxClient(string baseUrl, string token, string fingerprint = null, TimeSpan? timeout = null)
    {
#if !NETCOREAPP
        // .NET Framework: an exe built without a target framework (csc.exe by hand) runs with
        // 4.0's protocol defaults, TLS 1.0 at most, which the box refuses. This only adds 1.2.
        ServicePointManager.SecurityProtocol |= SecurityProtocolType.Tls12;
#endif
        var handler = new HttpClientHandler();
        if (fingerprint != null)
        {
            byte[] pinned = ParseFingerprint(fingerprint);
            // called during the handshake, before the request (and its token) is sent; a box is
            // known by its certificate alone, so the name and the CA do not matter
            handler.ServerCertificateCustomValidationCallback = (request, certificate, chain, errors) =>
            {
                if (certificate == null)
                {
                    return false;
                }
                byte[] seen;
                using (SHA256 sha256 = SHA256.Create())
                {
                    seen = sha256.ComputeHash(certificate.RawData);
                }
                if (Same(seen, pinned))
                {
                    return true;
                }
                if (request != null)
                {
                    _refused[request] = BitConverter.ToString(seen).Replace("-", ":");
                }
                return false;
            };
        }
        _http = new HttpClient(handler) { Timeout = timeout ?? TimeSpan.FromSeconds(120) };
        _http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        _rpc = new Uri(new Uri(baseUrl.TrimEnd('/') + "/"), "rpc");
    }

    // The call's result; ScanboxException for the box's error answer, HttpRequestException when
    // the box cannot be reached or is not the pinned one, TaskCanceledException on the timeout.
    public async Task<XElement> CallAsync(string method, IDictionary<string, object> parameters = null,
                                          CancellationToken cancel = default(CancellationToken))
    {
        var message = new XElement("root", new XAttribute("type", "object"),
            Json("jsonrpc", "2.0"),
            Json("id", Interlocked.Increment(ref _nextId)),
            Json("method", method),
            Json("params", parameters ?? new Dictionary<string, object>()));
        byte[] body;
        using (var buffer = new MemoryStream())
        {
            using (XmlDictionaryWriter writer = JsonReaderWriterFactory.CreateJsonWriter(buffer, new UTF8Encoding(false), false))
            {
                message.WriteTo(writer);
            }
            body = buffer.ToArray();
        }
        using (var post = new HttpRequestMessage(HttpMethod.Post, _rpc))
        {
            post.Content = new ByteArrayContent(body);
            post.Content.Headers.ContentType = new MediaTypeHeaderValue("application/json") { CharSet = "utf-8" };
            HttpResponseMessage response;
            string seen;
            try
            {
                // ConfigureAwait(false): a WinForms HIS that waits on .Result does not deadlock
                response = await _http.SendAsync(post, cancel).ConfigureAwait(false);
            }
            catch (HttpRequestException e)
            {
                if (!_refused.TryGetValue(post, out seen))
                {
                    throw;
                }
                throw new HttpRequestException("the box's certificate is not the pinned one (its SHA-256 is "
                                               + seen + ")", e);
            }
            finally
            {
                _refused.TryRemove(post, out seen);
            }
            using (response)
            {
                // 401, 403, 413 and 429 also carry a JSON-RPC error object: read it whatever the status
                byte[] answer = await response.Content.ReadAsByteArrayAsync().ConfigureAwait(false);
                return Result(answer, (int)response.StatusCode);
            }
        }
    }

    // true for a JSON null (or a member that is not there at all)
    public static bool IsNull(XElement value)
    {
        return value == null || (string)value.Attribute("type") == "null";
    }

    private static XElement Result(byte[] answer, int status)
    {
        XElement root;
        try
        {
            using (XmlDictionaryReader reader = JsonReaderWriterFactory.CreateJsonReader(answer, XmlDictionaryReaderQuotas.Max))
            {
                root = XElement.Load(reader);
            }
        }
        catch (XmlException e)
        {
            throw new HttpRequestException("HTTP " + status + " without a JSON-RPC answer: " + e.Message, e);
        }
        XElement error = root.Element("error");
        if (error != null)
        {
            XElement data = error.Element("data");
            string reason = data != null && (string)data.Attribute("type") == "object" && !IsNull(data.Element("reason"))
                ? (string)data.Element("reason") : null;
            throw new ScanboxException((int)error.Element("code"), (string)error.Element("message"), reason, data);
        }
        XElement result = root.Element("result");
        if (result == null)
        {
            throw new HttpRequestException("HTTP " + status + ": a JSON-RPC answer without result or error");
        }
        return result;
    }

    // JSON as JsonReaderWriterFactory's writer takes it: an element per value, its type attribute saying which
    private static XElement Json(string name, object value)
    {
        XElement element;
        try
        {
            element = new XElement(XmlConvert.VerifyNCName(name));
        }
        catch (XmlException)
        {
            element = new XElement(XName.Get("item", "item"), new XAttribute("item", name));
        }
        if (value == null)
        {
            element.Add(new XAttribute("type", "null"));
        }
        else if (value is string || value is char)
        {
            element.Add(new XAttribute("type", "string"), value.ToString());
        }
        else if (value is bool)
        {
            element.Add(new XAttribute("type", "boolean"), (bool)value ? "true" : "false");
        }
        else if (value is int || value is long || value is short || value is byte || value is uint
                 || value is ulong || value is ushort || value is sbyte || value is decimal)
        {
            element.Add(new XAttribute("type", "number"), Convert.ToString(value, CultureInfo.InvariantCulture));
        }
        else if (value is double || value is float)
        {
            double number = Convert.ToDouble(value, CultureInfo.InvariantCulture);
            if (double.IsNaN(number) || double.IsInfinity(number))
            {
                throw new ArgumentException(name + ": JSON has no NaN or infinity");
            }
            element.Add(new XAttribute("type", "number"), number.ToString("R", CultureInfo.InvariantCulture));
        }
        else if (value is IDictionary<string, object>)
        {
            element.Add(new XAttribute("type", "object"));
            foreach (KeyValuePair<string, object> member in (IDictionary<string, object>)value)
            {
                element.Add(Json(member.Key, member.Value));
            }
        }
        else if (value is IEnumerable)
        {
            element.Add(new XAttribute("type", "array"));
            foreach (object item in (IEnumerable)value)
            {
                element.Add(Json("item", item));
            }
        }
        else
        {
            throw new ArgumentException(name + ": a " + value.GetType().Name + " is not a JSON value"
                                        + " (strings, numbers, booleans, null, dictionaries and lists are)");
        }
        return element;
    }

    // a fingerprint is public: no need for a constant-time compare
    private static bool Same(byte[] a, byte[] b)
    {
        if (a.Length != b.Length)
        {
            return false;
        }
        for (int i = 0; i < a.Length; i++)
        {
            if (a[i] != b[i])
            {
                return false;
            }
        }
        return true;
    }

    // "AB:CD:..." (as scanbox prints it), "abcd..." or "AB CD ...": 32 bytes
    private static byte[] ParseFingerprint(string text)
    {
        string hex = text.Replace(":", "").Replace(" ", "");
        if (hex.Length != 64)
        {
            throw new ArgumentException("a SHA-256 fingerprint is 64 hex digits, got " + hex.Length, "fingerprint");
        }
        var bytes = new byte[32];
        for (int i = 0; i < 32; i++)
        {
            if (!Uri.IsHexDigit(hex[2 * i]) || !Uri.IsHexDigit(hex[2 * i + 1]))
            {
                throw new ArgumentException("a SHA-256 fingerprint is hex digits, got " + text, "fingerprint");
            }
            bytes[i] = Convert.ToByte(hex.Substring(2 * i, 2), 16);
        }
        return bytes;
    }

    public void Dispose()
    {
        _http.Dispose();
    }
}

public static class Program
{
    // ScanboxClient.exe URL TOKEN [FINGERPRINT [TIMEOUT_S]]
    //   ScanboxClient.exe http://127.0.0.1:7801 TOKEN
    //   ScanboxClient.exe https://10.1.2.3:7801 TOKEN AB:CD:...:EF
    // status, then one read_card (waiting TIMEOUT_S, 60 unless given, for the patient)
    public static int Main(string[] args)
    {
        return Run(args).GetAwaiter().GetResult();
    }

    private static async Task<int> Run(string[] args)
    {
        if (args.Length < 2)
        {
            Console.Error.WriteLine("usage: ScanboxClient URL TOKEN [FINGERPRINT [TIMEOUT_S]]");
            return 2;
        }
        string fingerprint = args.Length > 2 && args[2].Length > 0 ? args[2] : null;
        int timeout = 60;
        ScanboxClient box;
        try
        {
            if (args.Length > 3)
            {
                timeout = int.Parse(args[3], CultureInfo.InvariantCulture);
            }
            box = new ScanboxClient(args[0], args[1], fingerprint, TimeSpan.FromSeconds(timeout + 30));
        }
        catch (Exception e)
        {
            if (!(e is ArgumentException || e is FormatException || e is OverflowException || e is UriFormatException))
            {
                throw;
            }
            Console.Error.WriteLine("usage: ScanboxClient URL TOKEN [FINGERPRINT [TIMEOUT_S]]: {0}", e.Message);
            return 2;
        }
        using (box)
        {
            try
            {
                XElement status = await box.CallAsync("status");
                XElement reachable = status.Element("platform").Element("reachable");
                Console.WriteLine("box {0}, platform reachable: {1}", (string)status.Element("device_id"),
                                  ScanboxClient.IsNull(reachable) ? "not asked yet" : (string)reachable);
                Console.WriteLine("请出示电子健康卡 (waiting up to {0} s)...", timeout);
                XElement result = await box.CallAsync("read_card", new Dictionary<string, object> { { "timeout_s", timeout } });
                XElement verification = result.Element("verification");
                if ((bool)verification.Element("ok"))
                {
                    XElement who = result.Element("identity");
                    Console.WriteLine("{0} {1}", (string)who.Element("name"), (string)who.Element("id_number"));
                }
                else
                {
                    Console.WriteLine("not verified: {0}", (string)verification.Element("reason"));
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
            catch (TaskCanceledException)
            {
                Console.Error.WriteLine("the box did not answer within {0} s", timeout + 30);
                return 1;
            }
        }
    }
}
