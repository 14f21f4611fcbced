//! Protobuf messages of CRIU's RPC interface (`criu swrk`) and of the few image files the agent
//! reads, hand-declared with `prost` from the vendored `agent/proto/rpc.proto` (MIT) and CRIU's
//! `images/cpuinfo.proto`. Only the fields the agent uses are declared; prost skips the others,
//! and the tag numbers are the proto's own.

/// `criu_req_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReqType {
    Empty = 0,
    Dump = 1,
    Restore = 2,
    Check = 3,
    PreDump = 4,
    PageServer = 5,
    Notify = 6,
    CpuinfoDump = 7,
    CpuinfoCheck = 8,
    FeatureCheck = 9,
    Version = 10,
    WaitPid = 11,
    PageServerChld = 12,
    SinglePreDump = 13,
}

/// `criu_opts` (subset).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Opts {
    #[prost(int32, required, tag = "1", default = "-1")]
    pub images_dir_fd: i32,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
    #[prost(bool, optional, tag = "3")]
    pub leave_running: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub ext_unix_sk: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    pub tcp_established: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub shell_job: Option<bool>,
    #[prost(bool, optional, tag = "8")]
    pub file_locks: Option<bool>,
    #[prost(int32, optional, tag = "9")]
    pub log_level: Option<i32>,
    #[prost(string, optional, tag = "10")]
    pub log_file: Option<String>,
    #[prost(bool, optional, tag = "12")]
    pub notify_scripts: Option<bool>,
    #[prost(bool, optional, tag = "18")]
    pub link_remap: Option<bool>,
    #[prost(uint32, optional, tag = "20")]
    pub cpu_cap: Option<u32>,
    #[prost(bool, optional, tag = "26")]
    pub rst_sibling: Option<bool>,
    #[prost(message, repeated, tag = "27")]
    pub inherit_fd: Vec<InheritFd>,
    #[prost(bool, optional, tag = "24")]
    pub manage_cgroups: Option<bool>,
    /// `criu_cg_mode`.
    #[prost(int32, optional, tag = "34")]
    pub manage_cgroups_mode: Option<i32>,
    #[prost(uint32, optional, tag = "35")]
    pub ghost_limit: Option<u32>,
    #[prost(string, repeated, tag = "37")]
    pub external: Vec<String>,
    #[prost(bool, optional, tag = "46")]
    pub tcp_skip_in_flight: Option<bool>,
    #[prost(bool, optional, tag = "48")]
    pub lazy_pages: Option<bool>,
    #[prost(bool, optional, tag = "52")]
    pub tcp_close: Option<bool>,
    /// `criu_network_lock_method`.
    #[prost(int32, optional, tag = "64")]
    pub network_lock: Option<i32>,
    #[prost(string, optional, tag = "68")]
    pub images_dir: Option<String>,
    #[prost(bool, optional, tag = "69")]
    pub leave_stopped: Option<bool>,
    #[prost(string, optional, tag = "13")]
    pub root: Option<String>,
    #[prost(bool, optional, tag = "28")]
    pub auto_ext_mnt: Option<bool>,
    #[prost(bool, optional, tag = "30")]
    pub ext_masters: Option<bool>,
    #[prost(bool, optional, tag = "65")]
    pub mntns_compat_mode: Option<bool>,
}

/// `inherit_fd`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InheritFd {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(int32, required, tag = "2")]
    pub fd: i32,
}

/// `criu_features`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Features {
    #[prost(bool, optional, tag = "1")]
    pub mem_track: Option<bool>,
    #[prost(bool, optional, tag = "2")]
    pub lazy_pages: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    pub pidfd_store: Option<bool>,
}

/// `criu_req`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Req {
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub opts: Option<Opts>,
    #[prost(bool, optional, tag = "3")]
    pub notify_success: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub keep_open: Option<bool>,
    #[prost(message, optional, tag = "5")]
    pub features: Option<Features>,
}

/// `criu_dump_resp`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct DumpResp {
    #[prost(bool, optional, tag = "1")]
    pub restored: Option<bool>,
}

/// `criu_restore_resp`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RestoreResp {
    #[prost(int32, required, tag = "1")]
    pub pid: i32,
}

/// `criu_notify`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Notify {
    #[prost(string, optional, tag = "1")]
    pub script: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
}

/// `criu_version`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Version {
    #[prost(int32, required, tag = "1")]
    pub major_number: i32,
    #[prost(int32, required, tag = "2")]
    pub minor_number: i32,
    #[prost(string, optional, tag = "3")]
    pub gitid: Option<String>,
    #[prost(int32, optional, tag = "4")]
    pub sublevel: Option<i32>,
    #[prost(int32, optional, tag = "5")]
    pub extra: Option<i32>,
    #[prost(string, optional, tag = "6")]
    pub name: Option<String>,
}

/// `criu_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resp {
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(bool, required, tag = "2")]
    pub success: bool,
    #[prost(message, optional, tag = "3")]
    pub dump: Option<DumpResp>,
    #[prost(message, optional, tag = "4")]
    pub restore: Option<RestoreResp>,
    #[prost(message, optional, tag = "5")]
    pub notify: Option<Notify>,
    #[prost(int32, optional, tag = "7")]
    pub cr_errno: Option<i32>,
    #[prost(message, optional, tag = "8")]
    pub features: Option<Features>,
    #[prost(string, optional, tag = "9")]
    pub cr_errmsg: Option<String>,
    #[prost(message, optional, tag = "10")]
    pub version: Option<Version>,
    #[prost(int32, optional, tag = "11")]
    pub status: Option<i32>,
}

/// `cpuinfo_x86_entry` from `images/cpuinfo.proto`: every field, so that a decoded entry
/// re-encodes to the same bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CpuinfoX86Entry {
    #[prost(int32, required, tag = "1")]
    pub vendor_id: i32,
    #[prost(uint32, required, tag = "2")]
    pub cpu_family: u32,
    #[prost(uint32, required, tag = "3")]
    pub model: u32,
    #[prost(uint32, required, tag = "4")]
    pub stepping: u32,
    #[prost(uint32, required, tag = "5")]
    pub capability_ver: u32,
    #[prost(uint32, repeated, packed = "false", tag = "6")]
    pub capability: Vec<u32>,
    #[prost(string, optional, tag = "7")]
    pub model_id: Option<String>,
    #[prost(uint64, optional, tag = "8")]
    pub xfeatures_mask: Option<u64>,
    #[prost(uint32, optional, tag = "9")]
    pub xsave_size: Option<u32>,
    #[prost(uint32, optional, tag = "10")]
    pub xsave_size_max: Option<u32>,
}

/// `cpuinfo_entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CpuinfoEntry {
    #[prost(message, repeated, tag = "1")]
    pub x86_entry: Vec<CpuinfoX86Entry>,
}

/// `pstree_entry` from `images/pstree.proto`: one process of the dumped tree.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    #[prost(uint32, required, tag = "3")]
    pub pgid: u32,
    #[prost(uint32, required, tag = "4")]
    pub sid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// `pagemap_head` from `images/pagemap.proto`: the first entry of `pagemap-<pid>.img`, naming
/// the `pages-<id>.img` that holds the pages.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pub pages_id: u32,
}

/// `pagemap_entry` from `images/pagemap.proto`: a run of pages at `vaddr`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    pub vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    pub nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    pub in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    pub flags: Option<u32>,
    /// The run's length in pages as CRIU 4 writes it (`nr_pages` is then 0).
    #[prost(uint64, optional, tag = "5")]
    pub pages: Option<u64>,
}

/// `img_streamer_request_entry` (CRIU's `images/img-streamer.proto`): the image file
/// `criu restore --stream` asks for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamerRequest {
    #[prost(string, required, tag = "1")]
    pub filename: String,
}

/// `img_streamer_reply_entry`: whether that file exists (a pipe carrying it follows).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamerReply {
    #[prost(bool, required, tag = "1")]
    pub exists: bool,
}

/// The part of `core_entry` (`images/core.proto`, one `core-<tid>.img` per thread) that says
/// where a thread stands: x86-64 registers and its rseq area. Everything else is skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CoreEntry {
    #[prost(message, optional, tag = "2")]
    pub thread_info: Option<ThreadInfoX86>,
    #[prost(message, optional, tag = "5")]
    pub thread_core: Option<ThreadCore>,
}

/// `thread_info_x86` (`images/core-x86.proto`), in part.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ThreadInfoX86 {
    #[prost(uint64, optional, tag = "1")]
    pub clear_tid_addr: Option<u64>,
    #[prost(message, optional, tag = "2")]
    pub gpregs: Option<X86Regs>,
}

/// `user_x86_regs_entry`, in part.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X86Regs {
    #[prost(uint64, optional, tag = "17")]
    pub ip: Option<u64>,
    #[prost(uint64, optional, tag = "20")]
    pub sp: Option<u64>,
    #[prost(uint64, optional, tag = "22")]
    pub fs_base: Option<u64>,
}

/// `thread_core_entry`, in part: its `rseq_entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ThreadCore {
    #[prost(message, optional, tag = "15")]
    pub rseq_entry: Option<RseqEntry>,
}

/// `rseq_entry` (`images/rseq.proto`), in part.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RseqEntry {
    #[prost(uint64, optional, tag = "1")]
    pub rseq_abi_pointer: Option<u64>,
}
