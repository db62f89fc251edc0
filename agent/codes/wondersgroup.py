"""Code tables of spec 001 (wondersgroup healthCardService, the WSCallDLL.dll interface) and the
return codes spec 003 (Foshan JSON) shares with it.

Transcribed from the document; where it is garbled or contradicts itself the decision is noted
beside the entry.
"""

from __future__ import annotations

from agent.codes import CodeTable, Outcome, ReturnCode, ReturnCodeTable
from agent.model import Reason

_S, _R, _I, _A, _T = (Outcome.SUCCESS, Outcome.REJECTED, Outcome.INVALID_REQUEST, Outcome.AUTH,
                      Outcome.TRANSIENT)
_rc = ReturnCode

SUCCESS = "10000"
# "认证字符串失效,请重新操作本操作": get a new authKey, then send the call again
AUTH_EXPIRED = "10105"

# 错误码表, the codes the web service answers in resultCode. The document lists 10110 and 10109
# twice ("WebService返回参数错误" / "参数错误", "WebService返回卡不存在" / "卡号不存在"): one code
# each, both texts kept. It writes the lost/cancelled/voided card codes as 1010, 1020 and 1040
# (four digits, where every other code has five); kept as written, spec 003 lists 1010 and 1040
# the same way.
_SERVICE_CODES = [
    _rc(SUCCESS, "操作成功", _S),
    _rc("10101", "机构代码错误", _A, Reason.PLATFORM_AUTH, "WebService返回机构代码错误"),
    _rc("10102", "用户名错误", _A, Reason.PLATFORM_AUTH, "WebService用户名错误"),
    _rc("10103", "密码错误", _A, Reason.PLATFORM_AUTH, "WebService返回密码错误"),
    # an expired authKey is refreshed and the call retried by the adapter (once per expiry); a
    # 10105 for a key fetched right after the call's own 10105 means the platform does not
    # accept this box
    _rc(AUTH_EXPIRED, "认证字符串无效", _A, Reason.PLATFORM_AUTH, "WebService认证字符串失效,请重新操作本操作"),
    _rc("10108", "身份证未办卡", _R, Reason.CARD_NOT_FOUND),
    _rc("10109", "卡号不存在", _R, Reason.CARD_NOT_FOUND, "WebService返回卡不存在"),
    _rc("10110", "参数错误", _I, Reason.BAD_REQUEST, "WebService返回参数错误"),
    _rc("10111", "身份证号码不正确", _I, Reason.BAD_REQUEST),
    _rc("10112", "错误的操作代码", _I, Reason.BAD_REQUEST, "WebService返回错误的操作代码"),
    _rc("10113", "错误的性别代码", _I, Reason.BAD_REQUEST),
    _rc("10114", "姓名不能为空", _I, Reason.BAD_REQUEST),
    _rc("10115", "身份证已经办理过", _R, Reason.PLATFORM_REJECTED),
    _rc("10116", "卡号已经存在", _R, Reason.PLATFORM_REJECTED),
    _rc("10117", "只有正常和挂失的卡才能进行补换卡", _R, Reason.CARD_INACTIVE),
    _rc("10118", "卡关联的居民信息不存在", _R, Reason.CARD_NOT_FOUND),
    _rc("10119", "只有正常状态的才能挂失", _R, Reason.CARD_INACTIVE),
    _rc("10121", "只有挂失状态的才能解挂失", _R, Reason.CARD_INACTIVE),
    _rc("10122", "补换卡时必需提供身份证或者原卡号", _I, Reason.BAD_REQUEST),
    _rc("10123", "民族代码不正确", _I, Reason.BAD_REQUEST),
    _rc("10124", "出生日期格式不正确", _I, Reason.BAD_REQUEST),
    _rc("10125", "卡已被使用", _R, Reason.PLATFORM_REJECTED),
    _rc("10126", "消费类型不正确", _I, Reason.BAD_REQUEST),
    _rc("10127", "旧卡已经在黑名单中", _R, Reason.CARD_INACTIVE),
    _rc("10128", "发卡时间格式不正确", _I, Reason.BAD_REQUEST),
    # the platform's own network failed behind it: worth asking again later
    _rc("10129", "网络异常", _T, Reason.PLATFORM_UNAVAILABLE),
    _rc("10130", "卡号和身份证号码关联不上", _R, Reason.PLATFORM_REJECTED),
    _rc("10131", "医疗费用支付方式不正确", _I, Reason.BAD_REQUEST),
    _rc("10132", "婚姻状况代码不正确", _I, Reason.BAD_REQUEST),
    _rc("10133", "学历代码不正确", _I, Reason.BAD_REQUEST),
    _rc("10134", "证件类型不正确", _I, Reason.BAD_REQUEST),
    _rc("10135", "职业代码不正确", _I, Reason.BAD_REQUEST),
    _rc("10136", "地址类别不正确", _I, Reason.BAD_REQUEST),
    _rc("10137", "疫苗接种日期不正确", _I, Reason.BAD_REQUEST),
    _rc("10138", "ABO血型代码不正确", _I, Reason.BAD_REQUEST),
    _rc("10139", "RH血型代码不正确", _I, Reason.BAD_REQUEST),
    _rc("10140", "医学警示标志值域错误,应为T或F", _I, Reason.BAD_REQUEST),
    _rc("10141", "芯片序列号不正确", _I, Reason.BAD_REQUEST),
    _rc("10142", "发卡序列号不正确", _I, Reason.BAD_REQUEST),
    _rc("10143", "身份证办理过多张健康卡", _R, Reason.PLATFORM_REJECTED),
    _rc("10144", "应用城市代码未填写或填写错误", _I, Reason.BAD_REQUEST),
    _rc("10149", "对象或其属性值均为空，请检查语言对复杂对象的支持", _I, Reason.BAD_REQUEST),
    _rc("10150", "卡号与身份证不相同", _R, Reason.PLATFORM_REJECTED),
    _rc("10151", "银行卡号错误", _I, Reason.BAD_REQUEST),
    _rc("10152", "联系人关系不正确", _I, Reason.BAD_REQUEST),
    _rc("10153", "芯片序列号重复", _R, Reason.PLATFORM_REJECTED),
    _rc("10154", "发卡方式错误", _I, Reason.BAD_REQUEST),
    _rc("10155", "银行代码错误", _I, Reason.BAD_REQUEST),
    _rc("10156", "该人属于贫困人口", _R, Reason.PLATFORM_REJECTED),
    _rc("1010", "卡已挂失", _R, Reason.CARD_INACTIVE, "WebService返回卡已挂失"),
    _rc("1020", "卡已注销", _R, Reason.CARD_INACTIVE, "WebService返回卡已注销"),
    _rc("1040", "卡已作废", _R, Reason.CARD_INACTIVE, "WebService返回卡已作废"),
]

RETURN_CODES = ReturnCodeTable("wondersgroup healthCardService 错误码", _SERVICE_CODES)

# The DLL's own return values (WSCallDLL.dll, the negative codes of the same table): what the
# Windows component answered for device and configuration failures. scanbox has no DLL, but a
# HIS migrating from it may log or map these; kept as data so `platform_code` can be explained.
DEVICE_CODES = ReturnCodeTable("WSCallDLL.dll 返回值", [
    _rc("0", "成功", _S),
    _rc("-11", "功能不支持", _R, Reason.NOT_SUPPORTED),
    _rc("-14", "设备未初始化或已关闭", _T, Reason.DEVICE_ERROR),
    _rc("-15", "传入数据格式无效", _I, Reason.BAD_REQUEST),
    _rc("-16", "未知错误", _T, Reason.INTERNAL),
    _rc("-24", "未寻到卡,[没放卡或卡型无效],请重试!", _R, Reason.DEVICE_ERROR),
    _rc("-33", "设备连接异常", _T, Reason.DEVICE_ERROR),
    _rc("-100", "读取配置文件失败", _I, Reason.BAD_REQUEST),
    _rc("-101", "调用Java WebService失败", _T, Reason.PLATFORM_UNAVAILABLE),
    _rc("-102", "写配置文件失败", _T, Reason.INTERNAL),
])

# Spec 003 2.2: the same 10xxx list (it writes "认证字符串无效" for 10105) plus 10157. Its card
# states differ: 1010 已挂失 and 1040 已注销 (spec 001: 1040 卡已作废, 1020 卡已注销); no 1020.
FSJSON_RETURN_CODES = ReturnCodeTable("Foshan 电子健康卡接口返回代码", [
    *(rc for rc in _SERVICE_CODES if not rc.code.startswith("10") or len(rc.code) == 5),
    _rc("10157", "绑定信息不匹配", _R, Reason.PLATFORM_REJECTED),
    _rc("1010", "已挂失", _R, Reason.CARD_INACTIVE),
    _rc("1040", "已注销", _R, Reason.CARD_INACTIVE),
])

# 12.1 数据代码对照表, the dictionaries useCardInfo's fields are checked against.
DEPARTMENT_TYPE = CodeTable("wondersgroup-12.1.14", "科室类型", {
    "1": "挂号科室", "2": "收费科室", "3": "门诊科室", "4": "住院科室", "5": "检查科室",
    "6": "检验科室", "7": "处置治疗科室", "8": "药房", "9": "手术麻醉", "10": "其它科室",
})

MEDICAL_STEP = CodeTable("wondersgroup-12.1.15", "诊疗环节代码", {
    "010101": "挂号", "010102": "诊断", "010103": "取药", "010104": "检查", "010105": "收费",
    "010106": "开方", "010107": "手术", "000000": "其他",
})

MEDICAL_TYPE = CodeTable("wondersgroup-12.1.18", "就诊类型", {
    "1": "住院", "2": "门诊", "3": "急诊", "4": "体检", "5": "其他",
})

# useCardInfo.issuingMode is "二维码来源渠道" (12.1.19), not CardInfo's 发卡方式 of the same name
QR_CHANNEL = CodeTable("wondersgroup-12.1.19", "二维码来源渠道", {
    "2": "医院窗口", "5": "APP(第三方APP)", "6": "医疗卫生机构自助机", "7": "微信公众号",
    "8": "支付宝小程序", "9": "其它", "10": "微信小程序", "11": "支付宝生活号",
})

ISSUING_MODE = CodeTable("wondersgroup-发卡方式", "发卡方式", {
    "1": "区域批量发卡", "2": "医院现场发卡", "3": "银行网点发卡", "4": "电信网点发卡",
    "5": "APP在线申请", "6": "医疗卫生机构自助机申请", "7": "微信公众号",
})

TERMINAL_TYPE = CodeTable("wondersgroup-TerminalType", "终端类型", {"1": "人工窗口", "2": "自助终端"})
