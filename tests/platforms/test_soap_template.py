"""An operation whose parameters are all strings is built by zeep once and then filled in by lxml
(soapservice.Template): each request must be byte for byte what zeep's create_message builds, for
every WSDL style a site can have, with text that needs escaping; anything else is zeep's."""

from __future__ import annotations

import pytest
from lxml import etree

from agent.model import ScanboxError
from agent.platforms import wsdl
from agent.platforms.soapservice import SoapService
from agent.platforms.transport import HttpClient
from agent.simulator.soap import WsdlStyle, render_wsdl

STYLES = [
    WsdlStyle(),
    WsdlStyle(namespace="http://other.ns/", action_part="arg0", message_part="arg1"),
    WsdlStyle(namespace="http://local.ns/", action_part="message", message_part="action"),
]
TEXTS = ["<request><qr_code>A&amp;B</qr_code></request>", "张晓明 \"quoted\" 'single' & <tag> ]]> \t tab",
         "", "x" * 3000]


async def loaded(tmp_path, path, needed) -> SoapService:
    http = HttpClient(timeout_s=2, tls_verify=True)
    service = SoapService("test", wsdl.WsdlSource(str(path), "rhc.wsdl"), tmp_path / "cache", http,
                          "http://127.0.0.1:9/x", 2, needed)
    await service.bound()
    await http.close()
    return service


async def zeeps(service: SoapService, operation: str, params: dict) -> bytes:
    client, proxy = await service.zeep_port()
    return etree.tostring(client.create_message(proxy, operation, **params), encoding="utf-8",
                          xml_declaration=True)


async def templates(service: SoapService, operation: str, params: dict) -> bytes | None:
    template = (await service.bound()).operations[operation].template
    return None if template is None else template.render(params)


@pytest.mark.parametrize("style", STYLES, ids=["jaxws", "arg0-arg1-external", "swapped"])
async def test_rhc_requests_from_the_template_are_zeeps(tmp_path, style):
    path = tmp_path / "site.wsdl"
    path.write_text(render_wsdl("http://192.0.2.1:1/unused", style), encoding="utf-8")
    service = await loaded(tmp_path, path, ["RHCMessageServer"])
    for action in TEXTS:
        for message in TEXTS[:2]:
            params = {style.action_part: action, style.message_part: message}
            built = await templates(service, "RHCMessageServer", params)
            assert built is not None
            assert built == await zeeps(service, "RHCMessageServer", params)
            assert etree.fromstring(built).findtext(".//%s" % style.action_part) == action
    # each request is written from the template, which keeps its placeholders (and nothing of a request)
    template = (await service.bound()).operations["RHCMessageServer"].template
    assert template is not None and "scanbox-template-" in etree.tostring(template.envelope).decode()
    assert "张晓明" not in etree.tostring(template.envelope, encoding="unicode")
    # one that cannot be written (text XML cannot carry) leaves nothing behind either
    with pytest.raises(ValueError):
        template.render({style.action_part: "张晓明", style.message_part: "\x01"})
    assert "张晓明" not in etree.tostring(template.envelope, encoding="unicode")


async def test_wondersgroup_string_operations_from_the_template_others_from_zeep(tmp_path):
    service = await loaded(tmp_path, wsdl.SHIPPED / "wondersgroup.wsdl", ["getAuthKey"])
    params = {"orgCode": "Q&1", "userName": "<u>", "passWord": "p'w\""}
    assert await templates(service, "getAuthKey", params) == await zeeps(service, "getAuthKey", params)
    # a parameter left out (zeep omits it) or not a string: zeep builds the request
    assert await templates(service, "getAuthKey", {"orgCode": "Q1", "userName": "u"}) is None
    assert await templates(service, "getAuthKey", {"orgCode": "Q1", "userName": "u", "passWord": 5}) is None
    # an operation with a structured parameter never has a template
    assert await templates(service, "syncCardInfo", {"orgCode": "Q1", "authKey": "k", "cardInfo": None}) is None
    assert service._bound.operations["syncCardInfo"].template is None


async def test_text_xml_cannot_carry_is_a_bad_request(tmp_path):
    path = tmp_path / "site.wsdl"
    path.write_text(render_wsdl("http://127.0.0.1:9/x", WsdlStyle()), encoding="utf-8")
    service = await loaded(tmp_path, path, ["RHCMessageServer"])
    with pytest.raises(ScanboxError) as info:
        await service.send("RHCMessageServer", {"action": "a\x01b", "message": "m"})
    assert "cannot be built" in info.value.message
