"""execnet_single: run parts of a program in any Python you can reach.

One file, standard library only, CPython 3.6-3.15 and PyPy 3 on both ends.
The local side sends this file's own source text to the remote interpreter,
so both ends always run identical code and nothing is installed remotely.
It is a drop-in for execnet (``import execnet_single as execnet``).

Sections (each uses only the ones above it):

  1. Compat, tracing and logging          (both ends)
  2. Errors and message texts             (both ends)
  3. Serializer                           (both ends)
  4. Framing and byte streams             (both ends)
  5. Channels                             (both ends)
  6. Gateway core                         (both ends)
  7. Remote side                          (remote only)
  8. Bootstrap                            (wherever a process is started)
  9. Local gateways: popen, via, socket, ssh  (local side)
 10. XSpec, exec models, Group, MultiChannel, RSync
 11. Remote calls: Gateway.call, Executor (local side; the call server remotely)
 12. Import forwarding: forward= (local side answers; the finder remotely)
 13. Socket server                        (python -m execnet_single serve)
 14. CLI

(PYTEST_DONT_REWRITE: `-p execnet_single` loads this already imported module
as a pytest plugin; this marker keeps pytest from warning about that.)
"""

import os
import struct
import sys
import threading

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Channel",
    "DataFormatError",
    "DumpError",
    "ExecnetError",
    "Executor",
    "Gateway",
    "GatewayDied",
    "Group",
    "HostNotFound",
    "InterpreterNotFound",
    "LoadError",
    "MultiChannel",
    "PopenGateway",
    "RSync",
    "RemoteError",
    "RemoteTooOld",
    "SocketGateway",
    "SshAuthenticationFailed",
    "SshConnectionFailed",
    "SshError",
    "SshGateway",
    "SshHostKeyError",
    "SshNameNotResolved",
    "TimeoutError",
    "XSpec",
    "default_group",
    "dump",
    "dumps",
    "get_execmodel",
    "install_as_execnet",
    "load",
    "loads",
    "makegateway",
    "register_remote_exception",
    "serve",
    "set_execmodel",
]

# Set by the bootstrap on the remote side: the exact bytes of this file.
_SOURCE = None


# === 1. Compat, tracing and logging ===

try:  # the C queue, without importing queue.py (and heapq) at remote start
    from _queue import Empty as _Empty, SimpleQueue as _Queue
except ImportError:  # 3.6: no SimpleQueue yet
    from queue import Empty as _Empty, Queue as _Queue
_builtin_TimeoutError = TimeoutError

# This process's pid, kept right across os.fork() by an at-fork hook that
# the first gateway installs, so the per-frame fork check costs no system
# call.  None on 3.6 (no hooks there): the check calls os.getpid().
_PID = [None]


def _watch_forks():
    if _PID[0] is None and hasattr(os, "register_at_fork"):
        _PID[0] = os.getpid()
        os.register_at_fork(after_in_child=_forked)


def _forked():
    _PID[0] = os.getpid()


# Windows (tested under Wine only): no select on pipes, no process groups,
# no os.nice; the helpers below stand in where this file needs them.
_WINDOWS = sys.platform == "win32"
# nice= on Windows: the priority class nearest to that niceness
_CREATE_NEW_PROCESS_GROUP = 0x200
_WINDOWS_PRIORITY = ((10, 0x40), (1, 0x4000), (0, 0x20), (-9, 0x8000), (-20, 0x80))


def _pipe_available(rfd):
    """Windows: how many bytes pipe fd rfd holds now; None at its end."""
    import _winapi
    import msvcrt

    try:
        return _winapi.PeekNamedPipe(msvcrt.get_osfhandle(rfd), 0)[0]
    except OSError:
        return None


def _binary_fds(*fds):
    """Windows: no newline translation on these fds (a no-op elsewhere)."""
    if _WINDOWS:
        import msvcrt

        for fd in fds:
            msvcrt.setmode(fd, os.O_BINARY)


def _kill_group(popen, sig=9):
    """Signal the process group popen leads (it was started in a new session);
    Windows has none: TerminateProcess on the process itself."""
    if _WINDOWS:
        popen.kill()
    else:
        os.killpg(popen.pid, sig)


def _set_niceness(value):
    """os.nice(value), or on Windows the matching priority class."""
    if not _WINDOWS:
        os.nice(value)
        return
    import ctypes

    for floor, priority_class in _WINDOWS_PRIORITY:
        if value >= floor:
            break
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.GetCurrentProcess.restype = ctypes.c_void_p  # (a 64-bit handle)
    kernel32.SetPriorityClass.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    if not kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), priority_class):
        raise ctypes.WinError(ctypes.get_last_error())


# Windows: the job object whose processes end with this one (see _end_with_me)
_JOB = []


def _end_with_me(popen):
    """Windows: popen's process (and what it starts) is killed when this
    process ends, however it ends (a job object that kills on close: Windows
    has no process groups to signal, and a killed server would leave its
    sessions running).  Best effort: False if Windows refused."""
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateJobObjectW.restype = ctypes.c_void_p
    kernel32.CreateJobObjectW.argtypes = (ctypes.c_void_p, ctypes.c_wchar_p)
    kernel32.SetInformationJobObject.argtypes = (ctypes.c_void_p, ctypes.c_int,
                                                 ctypes.c_void_p, ctypes.c_uint32)
    kernel32.AssignProcessToJobObject.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
    if not _JOB:
        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            return False
        size = ctypes.c_size_t

        class Limits(ctypes.Structure):   # JOBOBJECT_EXTENDED_LIMIT_INFORMATION
            _fields_ = [("times", ctypes.c_int64 * 2), ("flags", ctypes.c_uint32),
                        ("working_set", size * 2), ("processes", ctypes.c_uint32),
                        ("affinity", size), ("priority", ctypes.c_uint32 * 2),
                        ("io_counters", ctypes.c_uint64 * 6), ("memory", size * 4)]

        info = Limits()
        info.flags = 0x2000   # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not kernel32.SetInformationJobObject(job, 9, ctypes.byref(info),
                                                ctypes.sizeof(info)):
            return False
        _JOB.append(job)   # never closed: closing it is what kills them
    return bool(kernel32.AssignProcessToJobObject(_JOB[0], int(popen._handle)))


def _split_command(text):
    """A python= command as an argv list: shlex's POSIX rules, except that on
    Windows a backslash is a path separator (C:\\Python313\\python.exe) and
    "double quotes" group words."""
    import shlex

    if not _WINDOWS:
        return shlex.split(text)
    return [word[1:-1] if len(word) > 1 and word[0] == word[-1] == '"' else word
            for word in shlex.split(text, posix=False)]


def _trace_off(*msg):
    """Tracing is off: do nothing."""


_trace = _trace_off  # replaced by _setup_trace() when EXECNET_DEBUG is set
_trace_state = {"setup": False}
# Names install_as_execnet() took over here; every gateway started from
# here takes them over too, even where that name is importable.
_alias_state = {"forced": set()}


def _setup_trace():
    """Read EXECNET_DEBUG (1: a file per process in the temp dir, 2: stderr)."""
    global _trace
    if _trace_state["setup"]:
        return
    _trace_state["setup"] = True
    level = os.environ.get("EXECNET_DEBUG")
    if not level:
        return
    if level == "2":
        stream = sys.__stderr__
    else:
        stream = _open_trace_file()
        if stream is None:
            return
    lock = threading.Lock()
    pid = os.getpid()

    def trace(*msg):
        line = "[%d] %s\n" % (pid, " ".join(str(m) for m in msg))
        with lock:
            try:
                stream.write(line)
                stream.flush()
            except Exception:
                pass

    _trace = trace


def _open_trace_file():
    """A new trace file execnet-debug-PID-RANDOM in the temp dir, or None.

    The temp dir is shared: the name holds random bytes so nobody can plant
    a file or symlink there first, it is created exclusively, never through
    a symlink, and mode 0600, as it holds the start of remote_exec sources.
    """
    import binascii
    import tempfile

    directory = tempfile.gettempdir()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for attempt in range(10):
        path = os.path.join(directory, "execnet-debug-%d-%s" % (
            os.getpid(), binascii.hexlify(os.urandom(6)).decode("ascii")))
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            continue
        except OSError:
            return None
        return open(fd, "w", buffering=1, encoding="utf-8")
    return None


def _daemon(target, args=(), name="execnet_single"):
    """Start target(*args) in a daemon thread (none may keep a process alive)."""
    thread = threading.Thread(target=target, args=args, name=name)
    thread.daemon = True
    thread.start()
    return thread


def _log(level, msg):
    """Send a diagnostic to the 'execnet_single' logger if logging is in use.

    logging is not imported for this: an application that never imported it
    has configured no handlers, and importing it costs remote start-up time.
    """
    _trace(msg)
    logging = sys.modules.get("logging")
    if logging is not None:
        try:
            logging.getLogger("execnet_single").log(level, msg)
        except Exception:
            pass


# === 2. Errors and message texts ===


class ExecnetError(Exception):
    """Root of every error execnet_single raises on purpose."""


class RemoteError(ExecnetError):
    """Code on the other side raised; carries its traceback as text."""

    def __init__(self, formatted):
        super().__init__(formatted)
        self.formatted = formatted

    def __str__(self):
        return self.formatted

    def __repr__(self):
        return "%s: %s" % (self.__class__.__name__, self.formatted)

    def warn(self):
        """Report an error nobody received (to the logger, never stderr)."""
        _log(30, "unhandled RemoteError: %s" % self.formatted)


class GatewayDied(RemoteError):
    """The remote ended unasked; the text says how, with its last stderr lines.

    channel._getremoteerror() gives it (pytest-xdist prints it as the reason
    a node went down); receive() still raises EOFError.
    """


# A remote exception of a builtin class (or of a class registered with
# register_remote_exception) is raised here as an instance of a subclass of
# both RemoteError and that class, made once per class, so that `except
# KeyError:` works.  The class is looked up by name, never made from text.
# Only Exception subclasses: KeyboardInterrupt, SystemExit, GeneratorExit
# stay plain RemoteError (an `except KeyboardInterrupt:` must mean this process).
_REGISTERED_ERRORS = {}   # (module, qualname) -> class registered by the user
_TYPED_ERRORS = {}        # (module, qualname) -> the RemoteError subclass made


def register_remote_exception(cls):
    """Raise remote exceptions of this (importable) class locally as cls too."""
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        raise TypeError(_Text.NOT_AN_EXCEPTION_CLASS % (cls,))
    key = (cls.__module__, cls.__qualname__)
    _REGISTERED_ERRORS[key] = cls
    _TYPED_ERRORS.pop(key, None)
    return cls


def _typed_error_class(module, qualname):
    """The RemoteError subclass for a remote exception class, or None."""
    key = (module, qualname)
    made = _TYPED_ERRORS.get(key)
    if made is not None:
        return made
    base = _REGISTERED_ERRORS.get(key)
    if base is None and module == "builtins":
        import builtins

        base = getattr(builtins, qualname, None)
    if not (isinstance(base, type) and issubclass(base, Exception)) or issubclass(
            base, RemoteError):
        return None
    try:
        # base first: its __new__ (OSError's errno handling, MemoryError's
        # freelist) must be the one of the class's static base
        made = type("Remote" + base.__name__, (base, RemoteError), {
            "__module__": __name__, "__doc__": "RemoteError and %s." % qualname,
            "__str__": RemoteError.__str__, "__repr__": RemoteError.__repr__})
    except TypeError:  # an instance layout that cannot be combined
        return None
    _TYPED_ERRORS[key] = made
    return made


def _remote_error(text, kind=None):
    """The RemoteError for a remote traceback text; kind is (module,
    qualname, args) of the remote exception (see _error_kind)."""
    if kind:
        try:
            module, qualname, args = kind
            cls = _typed_error_class(module, qualname)
            if cls is not None:
                args = tuple(args)
                error = cls.__new__(cls, *args)
                cls.__bases__[0].__init__(error, *args)
                error.formatted = text
                return error
        except Exception:  # arguments the class does not take: plain
            pass
    return RemoteError(text)


def _error_kind(exc):
    """(module, qualname, args) of an exception, for _remote_error on the
    other side; None for BaseExceptions that are not Exceptions."""
    if not isinstance(exc, Exception):
        return None
    cls = type(exc)
    args = exc.args
    if isinstance(exc, OSError) and exc.filename is not None:
        args = (exc.errno, exc.strerror, exc.filename)
        if exc.filename2 is not None:
            args += (None, exc.filename2)
    try:
        dumps(args)
    except Exception:
        args = (str(exc),)
    return (cls.__module__, cls.__qualname__, args)


class _ErrorText(str):
    """An error text for Channel.close that also carries the _error_kind."""

    kind = None


class TimeoutError(ExecnetError, _builtin_TimeoutError):
    """A receive() or waitclose() with a timeout saw nothing in time."""


class DataFormatError(ExecnetError):
    """Data could not be serialized or deserialized."""


class DumpError(DataFormatError):
    """An object (or something inside it) cannot be serialized."""


class LoadError(DataFormatError):
    """Bytes are not a valid serialization (or frame stream)."""


class HostNotFound(ExecnetError):
    """A gateway could not be started; ``output`` is what the remote printed."""

    def __init__(self, message, output=""):
        self.message = message
        if output and output.strip():
            message = "%s\n--- remote output ---\n%s" % (message, output.rstrip())
        super().__init__(message)
        self.output = output


class InterpreterNotFound(HostNotFound):
    """The Python command for a gateway does not exist or cannot run."""


class RemoteTooOld(HostNotFound):
    """The remote interpreter is older than Python 3.6."""


class AuthenticationError(HostNotFound):
    """A socket peer did not prove it holds the key, or there is no usable key."""


class SshError(HostNotFound):
    """ssh could not give us a shell on the host; ``output`` is ssh's stderr."""


class SshNameNotResolved(SshError):
    """ssh could not resolve the host name."""


class SshConnectionFailed(SshError):
    """ssh resolved the host but could not connect (refused, timed out, unreachable)."""


class SshAuthenticationFailed(SshError, AuthenticationError):
    """The ssh server refused every credential ssh offered."""


class SshHostKeyError(SshError):
    """The host's key is unknown or differs from the recorded one."""


class _Text:
    """Message texts, kept in one place so tests and users can rely on them."""

    TOO_OLD = "remote Python %s is too old; execnet_single needs 3.6+ (%s)"
    NOT_FOUND = "could not start Python %r for gateway %s: %s"
    NO_ANSWER = "Python %r for gateway %s did not complete the bootstrap within %s seconds"
    DIED_IN_BOOTSTRAP = (
        "Python %r for gateway %s exited during bootstrap (exit status %s)"
    )
    BAD_BOOTSTRAP = "gateway %s: unexpected bootstrap reply %r"
    NOISE_DROPPED = "[%d earlier bytes of output not kept]"
    PRELOAD_FAILED = "gateway %s: preload=%s: the fork server could not import %s: %s"
    FORK_FAILED = "gateway %s: the fork server of Python %r could not fork: %s"
    CONNECTION_LOST = "gateway %s: connection to the remote side lost%s"
    DIED_UNKNOWN = "the remote side ended unasked (no reason known)"
    STACKS_CUT = "(stacks cut at %d characters)"
    STACKS_ABANDONED = ("still busy %s seconds after the exit request; leaving anyway. "
                        "Stacks of its threads:")
    STACKS_KILLED = "did not end in time: killed.  Stacks of its threads at the exit request:"
    STDERR_TAIL = "last lines it wrote to stderr:"
    CLOSE_IN_EXEC = "cannot explicitly close channel within remote_exec"
    HAS_CALLBACK = "cannot receive(), channel has receiver callback"
    SEND_CLOSED = "cannot send to %r"
    CHANNEL_PEER_CLOSED = "channel %d of gateway %s: closed by the other side"
    CHANNEL_CLOSED = "channel %d of gateway %s: closed here"
    CHANNEL_GATEWAY_ENDED = "channel %d of gateway %s: the gateway has ended"
    MAIN_THREAD_BUSY = (
        "concurrent remote_exec would cause deadlock for main_thread_only "
        "execmodel: another remote_exec is still running in the main thread"
    )
    INTERRUPTED = "keyboard-interrupted"
    FORKED = "this process is a fork of a gateway's process: it cannot use the gateway"
    BAD_OUTPUT_FD = ("protocol error: the remote sent an output frame for fd %d "
                     "(only fds 1 and 2 are forwarded)")
    CHANNEL_LOAD_FAILED = "gateway %s: could not load an item for channel %d: %s"
    ITEM_TOO_LARGE = (
        "gateway %s: an item for channel %d is larger than max_item=%d bytes: channel closed")
    ITEM_TOO_LARGE_TO_SEND = (
        "can't send an item of %d bytes: gateway %s takes items of at most max_item=%d bytes")
    NO_TRANSPORT = "no gateway type found for %r (known: %s)"
    BAD_SPEC_VALUE = "invalid value for xspec key %r in %r: %s"
    BAD_FLAG = "expected %s alone or =1/true/yes/on or =0/false/no/off"
    DUMP_TOO_DEEP = "can't serialize containers nested more than %d deep"
    LOAD_TOO_DEEP = "containers nested more than %d deep near byte %d"
    DUMP_INT_TOO_LONG = "can't serialize an int of more than %d decimal digits"
    LOAD_INT_TOO_LONG = "int of %d digits at byte %d: more than the limit of %d digits"
    # socket transport and server
    NO_KEY = ("gateway %s: no key for the socket server: give keyfile=PATH "
              "or set the environment variable EXECNET_SINGLE_KEY")
    KEY_UNSAFE = ("key file %s is readable or writable by others (mode %04o): "
                  "refused; run: chmod 600 %s")
    KEY_NOT_OWNED = ("key file %s belongs to uid %d, not to you (uid %d) or root: "
                     "refused (its owner could run code as you)")
    KEY_DIR_UNSAFE = ("directory %s (owner uid %d, mode %04o) of key file %s belongs to "
                      "another user or is writable by others: refused")
    KEY_UNREADABLE = "cannot read key file %s: %s"
    KEY_TOO_SHORT = "key in %s is too short (%d bytes; at least 16 are needed)"
    KEY_EXISTS = "key file %s exists already (use --force to replace it)"
    NOT_A_SERVER = "%s is not an execnet_single socket server (it sent %r)"
    SERVER_OPEN = ("socket server %s runs without authentication (--insecure): "
                   "refused; add the xspec key insecure to connect anyway")
    CLIENT_REJECTED = ("socket server %s closed the connection during authentication: "
                       "wrong key? (or the server dropped us: too many handshakes at once, "
                       "or its handshake timeout)")
    NO_GREETING = ("socket server %s closed the connection after %.1f seconds without a "
                   "greeting (a TLS server? then add the xspec key tls_ca=CA_FILE or tls)")
    DROPPED_AT_ONCE = ("socket server %s closed the connection at once, without a greeting: "
                       "it is busy (too many handshakes in progress: try again), serves one "
                       "client only (--once) and has it, or is no execnet_single server")
    FAKE_SERVER = ("socket server %s failed to prove it holds the key: "
                   "it is not the server you meant (or has another key)")
    AUTH_TIMEOUT = "socket server %s: authentication did not complete within %s seconds"
    CONNECT_FAILED = "gateway %s: could not connect to socket server %s: %s"
    INSTALL_FAILED = "gateway %s: could not start a socket server in gateway %s: %s"
    BAD_HOSTPORT = "expected host:port"
    INSECURE_NOT_LOOPBACK = ("--insecure is only allowed on a loopback address "
                             "(127.0.0.1, ::1, localhost), not %r")
    DROP_SHORT = "handshake ended after %d of 64 answer bytes"
    DROP_BAD_MAC = "wrong key (or not an execnet_single client)"
    DROP_TIMEOUT = "no complete handshake within %s seconds"
    DROP_BUSY = "too many handshakes in progress from this address (%d)"
    SLOTS_FULL = ("too many handshakes in progress (%d): new connections wait until one "
                  "ends or the oldest, after %.1f seconds, may be evicted")
    DROP_EVICTED = ("evicted: all handshake slots were taken and this one was the oldest "
                    "(a keyless or idle peer?)")
    DROP_ONCE = "this server serves one client only (--once)"
    BAD_MAX_HANDSHAKES = "--max-handshakes must be at least 1, not %d"
    SEAL_BROKEN = ("session with %s ended: %s (the connection was cut, or bytes were "
                   "injected, dropped or altered on the way)")
    SEAL_BAD_TAG = "record %d failed its authentication check"
    SEAL_BAD_LENGTH = "record %d has an invalid length word 0x%08x"
    SEAL_CUT_RECORD = "the stream ended inside a record"
    SEAL_NO_END = "the stream ended without its end record"
    SEAL_LOG = ": the client's stream failed its check (tampered with, or cut)"
    SEAL_MISMATCH = ("socket server %s answered for another kind of session (%r): refused")
    NOT_ENCRYPTED_WARNING = (
        "WARNING: listening on %s without TLS: sessions are authenticated and "
        "integrity-protected, but not encrypted (anyone on the path can read them)")
    # ssh transport
    SSH_FAILED = "gateway %s: ssh %s failed (exit status %s): %s"
    SSH_NO_PYTHON = "no python3 or python on the PATH of the remote shell"
    SSH_TO_WINDOWS = ("gateway %s: ssh %s reached a Windows shell (cmd or PowerShell): ssh "
                      "gateways to Windows hosts are not supported (its output is below)")
    SSH_BAD_ENV_NAME = "not a shell variable name (ssh passes env: through the remote shell)"
    NOT_AN_EXCEPTION_CLASS = "register_remote_exception needs an Exception subclass, not %r"
    # remote calls
    CALL_LAMBDA = "can't call %s remotely: a lambda has no name the remote can find; use def"
    CALL_CLOSURE = ("can't call %s remotely: it is a closure (uses variables of the "
                    "function around it)")
    CALL_NESTED = ("can't call %s remotely: it is defined inside another function; "
                   "define it at module level")
    NO_PYTEST = ("`python -m execnet_single pytest` runs the pytest (and pytest-xdist) "
                 "installed for this Python, and there is none: %s")
    CALL_BOUND = ("can't call %r remotely: a method bound to an object of this process; "
                  "call a module-level function")
    CALL_NOT_FUNCTION = ("can't call %r remotely: not a function, class or builtin "
                         "that the remote can find by module and name")
    CALL_NOT_SELF_CONTAINED = ("can't call %s remotely: the remote cannot import module "
                               "%r, and the function is not self-contained (%s)")
    CALL_BAD_ARG = "call of %s on gateway %s: %s"
    CALL_BAD_RESULT = "call of %s on gateway %s: can't send the result back: %s"
    CALL_LOST = "gateway %s: the call of %s did not complete: %s"
    CALL_LOST_EXIT = "the gateway exited"
    CALL_NO_GATEWAY = "Executor has no gateway left to run %s: %s"
    CALL_SHUTDOWN = "cannot schedule new calls after shutdown"
    FORWARD_REFUSED = "cannot forward module %r from the local side: %s"
    FORWARD_BAD_NAME = "%r is not a valid module name"
    FORWARD_NOT_ALLOWED = "top-level package %r is not on the forward= list"
    FORWARD_STDLIB = "it is part of the standard library (the remote uses its own)"
    FORWARD_NOT_FOUND = "the local side cannot find it on sys.path"
    FORWARD_NOT_SOURCE = "not a pure Python source file (%s)"
    FORWARD_UNREADABLE = "cannot read its source: %s"
    FORWARD_SYNTAX = "forwarded module %r does not compile on the remote's Python %s: %s"
    INSECURE_WARNING = ("WARNING: running WITHOUT authentication (--insecure): every local "
                        "user can run code as you through %s")


# === 3. Serializer ===
#
# Byte format (execnet's, so data written by one library loads in the other).
# A dump is the version byte 0x02, a postfix program of opcodes building the
# value on a stack, and 'Q'.  Integers in lengths and 'F' are 4-byte
# big-endian signed.
#
#   '@' n   tuple of the last n stack items    'L'      None
#   'A' n b bytes                              'N' n b  str (UTF-8)
#   'B' id  channel                            'O' n    set of last n items
#   'C'     False                              'P'      stack[-3][stack[-2]] = stack[-1]
#   'D' 8b  float (IEEE double, big-endian)    'Q'      stop
#   'E' n   frozenset of last n items          'R'      True
#   'F' i   int that fits in 4 bytes           'T' 16b  complex (two doubles)
#   'H' n b other int, as ASCII decimal        'J'      new empty dict
#   'K' n   new list of n Nones, filled by 'P'
#   legacy, load only: 'G' = 'F', 'I' = 'H', 'M' py2 str, 'S' py2 unicode
#
# Limits, the same both ways (dumps raises DumpError for what loads would
# refuse with LoadError):
# - Containers nest at most _MAX_DEPTH deep: a container's depth is 1 + the
#   largest depth among its items (and keys); scalars count 0, so [] and
#   [1, "a"] are 1 deep and [(1,)] is 2.  CPython hashes, compares and
#   prints nested values by recursing in C, and overflows the C stack
#   (a crash, not an exception) long before the 200,000 levels one MB of
#   data can hold: in a thread with a 128 KiB stack, on 3.6-3.13, hashing
#   a tuple nested ~2,000 deep or repr() of frozensets nested ~450 deep.
# - An 'H' ('I') int has at most _MAX_INT_DIGITS characters after its sign,
#   because converting decimal text takes time quadratic in its length.
#
# The same format is used on the wire between two execnet_single ends.

_OP_TUPLE = 64  # '@'
_OP_BYTES = 65  # 'A'
_OP_CHANNEL = 66  # 'B'
_OP_FALSE = 67  # 'C'
_OP_FLOAT = 68  # 'D'
_OP_FROZENSET = 69  # 'E'
_OP_INT = 70  # 'F'
_OP_INT_LEGACY = 71  # 'G'
_OP_BIGINT = 72  # 'H'
_OP_BIGINT_LEGACY = 73  # 'I'
_OP_DICT = 74  # 'J'
_OP_LIST = 75  # 'K'
_OP_NONE = 76  # 'L'
_OP_PY2STR = 77  # 'M'
_OP_STR = 78  # 'N'
_OP_SET = 79  # 'O'
_OP_SETITEM = 80  # 'P'
_OP_STOP = 81  # 'Q'
_OP_TRUE = 82  # 'R'
_OP_PY2UNICODE = 83  # 'S'
_OP_COMPLEX = 84  # 'T'

_MAX_DEPTH = 200  # far more than real data needs, far below a crash
_MAX_INT_DIGITS = 20000  # 4.6x 3.11's str() limit; loads in ~2 ms

_DUMPFORMAT_VERSION = b"\x02"
_INT4 = struct.Struct("!i")
_pack_i4 = _INT4.pack
_unpack_i4 = _INT4.unpack_from
_DOUBLE = struct.Struct("!d")
_COMPLEX = struct.Struct("!dd")
_INT4_MIN = -(2 ** 31)
_INT4_MAX = 2 ** 31 - 1
# 10**_MAX_INT_DIGITS has 66439 bits: an int of fewer bits has few enough
# digits, one of more has too many; only 66439 bits need counting digits.
_INT_BITS = 66439
# 'F' + index for the first list positions, precomputed for speed.
_LIST_INDEX = tuple(b"F" + _pack_i4(i) for i in range(1024))
_DECIMAL_CHUNK = 10 ** 1000


class _DumpFail(Exception):
    """Internal: carries the reason and the path while unwinding a dump."""

    def __init__(self, reason):
        Exception.__init__(self, reason)
        self.reason = reason
        self.path = []


def _int_to_ascii(value):
    """Decimal digits of any int, even past 3.11's int_max_str_digits."""
    try:
        return str(value).encode("ascii")
    except ValueError:  # 3.11+: too many digits for str()
        pass
    sign = b"-" if value < 0 else b""
    value = abs(value)
    parts = []
    while value:
        value, low = divmod(value, _DECIMAL_CHUNK)
        parts.append(low)
    head = str(parts.pop()).encode("ascii")
    return sign + head + b"".join(str(p).encode("ascii").rjust(1000, b"0") for p in reversed(parts))


def _ascii_to_int(digits):
    """int() of ASCII decimal digits, even past 3.11's int_max_str_digits."""
    if not digits or len(digits) != len(digits.strip()):
        raise ValueError("not a decimal integer: %r" % digits[:40])
    try:
        return int(digits)
    except ValueError:
        if len(digits) < 4000:
            raise
    negative = digits[:1] == b"-"
    body = digits[1:] if digits[:1] in (b"-", b"+") else digits
    if not body.isdigit():
        raise ValueError("not a decimal integer")
    value = 0
    first = len(body) % 1000 or 1000
    value = int(body[:first])
    for start in range(first, len(body), 1000):
        value = value * _DECIMAL_CHUNK + int(body[start:start + 1000])
    return -value if negative else value


def _short_repr(obj):
    """repr() for a DumpError's path, cut short: keys and set members can
    be whole nested structures."""
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


# Containers write their common items inline: exact types are checked
# first, and one struct call packs an opcode with its argument, often with
# the list index before it and the 'P' after it (a call per scalar would
# cost more than the writing).  An int beyond 4 bytes makes the packer raise
# struct.error and takes the general saver, like every other type; a str
# that is not UTF-8 is written again by the general saver, which says where.
# Helpers are default arguments: local names, not module globals.
_SAVERS = {}  # type -> saver, filled below
_PACK_OP_I4 = struct.Struct("!Bi").pack  # opcode, 4-byte int ('F', or a length)
_PACK_FLOAT = struct.Struct("!Bd").pack  # 'D', float
_PACK_INT_SET = struct.Struct("!BiB").pack  # 'F', int, 'P'
_PACK_FLOAT_SET = struct.Struct("!BdB").pack  # 'D', float, 'P'
_PACK_PAIR_SET = struct.Struct("!BiBiBiB").pack  # 'F', int, 'F', int, '@', 2, 'P'
_PACK_INDEX_INT = struct.Struct("!BiBiB").pack  # 'F', index, 'F', int, 'P'
_PACK_INDEX_STR = struct.Struct("!BiBi").pack  # 'F', index, 'N', length
_PACK_INDEX_FLOAT = struct.Struct("!BiBdB").pack  # 'F', index, 'D', float, 'P'
# The 'N' bytes of str dict keys, which repeat across dicts and calls;
# bounded, and safe between threads (single dict operations).
_KEYS = {}
_KEYS_MAX = 4096
_KEY_LEN_MAX = 100


def _key_bytes(key):
    """The 'N' bytes of a str dict key, kept if the key is short."""
    data = key.encode()
    data = b"N" + _pack_i4(len(data)) + data
    if len(key) <= _KEY_LEN_MAX:
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        _KEYS[key] = data
    return data


# Savers write obj with w; `depth` is how deep obj sits (1 at the top), so
# that containers can refuse to go past _MAX_DEPTH.

def _save(obj, w, depth):
    (_SAVERS.get(type(obj)) or _unknown)(obj, w, depth)


def _unknown(obj, w, depth):
    # Only types without a saver of their own get here, so the hot path does
    # not pay for this: members of Enums mixed with int/str/float/bytes
    # (IntEnum, StrEnum, IntFlag...) travel as their plain value (xdist#1161).
    enum = sys.modules.get("enum")  # not imported: obj is no Enum member
    if enum is not None and isinstance(obj, enum.Enum):
        for base, plain in _ENUM_PLAIN:
            if isinstance(obj, base):
                return _SAVERS[base](plain(obj), w, depth)
    raise _DumpFail("can't serialize %s" % (type(obj),))


# (base, function giving the base's exact-type value of an instance)
_ENUM_PLAIN = ((int, int.__int__), (str, str.__str__), (float, float.__float__),
               (bytes, bytes))


def _save_none(obj, w, depth):
    w(b"L")


def _save_bool(obj, w, depth):
    w(b"R" if obj else b"C")


def _save_int(obj, w, depth):
    if _INT4_MIN <= obj <= _INT4_MAX:
        w(b"F" + _pack_i4(obj))
    else:
        bits = obj.bit_length()
        digits = _int_to_ascii(obj) if bits <= _INT_BITS else b""
        if bits > _INT_BITS or len(digits) - (obj < 0) > _MAX_INT_DIGITS:
            raise _DumpFail(_Text.DUMP_INT_TOO_LONG % _MAX_INT_DIGITS)
        w(b"H" + _pack_i4(len(digits)) + digits)


def _save_float(obj, w, depth):
    w(b"D" + _DOUBLE.pack(obj))


def _save_complex(obj, w, depth):
    w(b"T" + _COMPLEX.pack(obj.real, obj.imag))


def _save_str(obj, w, depth):
    try:
        data = obj.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _DumpFail("can't serialize str that is not UTF-8 encodable (%s)" % exc)
    w(b"N" + _pack_i4(len(data)))
    w(data)


def _save_bytes(obj, w, depth):
    if len(obj) > _INT4_MAX:
        raise _DumpFail("can't serialize bytes longer than 2 GiB")
    w(b"A" + _pack_i4(len(obj)))
    w(obj)


def _save_list(obj, w, depth, get=_SAVERS.get, pack_op=_PACK_OP_I4, index_bytes=_LIST_INDEX,
               index_int=_PACK_INDEX_INT, index_str=_PACK_INDEX_STR,
               index_float=_PACK_INDEX_FLOAT, StructError=struct.error, LIST=_OP_LIST,
               INT=_OP_INT, STR=_OP_STR, FLOAT=_OP_FLOAT, SETITEM=_OP_SETITEM):
    if depth > _MAX_DEPTH:
        raise _DumpFail(_Text.DUMP_TOO_DEEP % _MAX_DEPTH)
    w(pack_op(LIST, len(obj)))
    index = 0
    item = None
    depth += 1
    try:
        try:
            for index, item in enumerate(obj):
                kind = type(item)
                if kind is int:
                    try:
                        w(index_int(INT, index, INT, item, SETITEM))
                        continue
                    except StructError:  # beyond 4 bytes: written below
                        pass
                elif kind is str:
                    data = item.encode()
                    w(index_str(INT, index, STR, len(data)))
                    w(data)
                    w(b"P")
                    continue
                elif kind is float:
                    w(index_float(INT, index, FLOAT, item, SETITEM))
                    continue
                w(index_bytes[index] if index < 1024 else pack_op(INT, index))
                if kind is dict:
                    _save_dict(item, w, depth)
                else:
                    (get(kind) or _unknown)(item, w, depth)
                w(b"P")
        except UnicodeEncodeError:
            _save(item, w, depth)  # raises, naming the str
            raise
    except _DumpFail as fail:
        fail.path.append("[%d]" % index)
        raise


def _save_dict(obj, w, depth, get=_SAVERS.get, keys=_KEYS, pack_op=_PACK_OP_I4,
               int_set=_PACK_INT_SET, float_set=_PACK_FLOAT_SET, pair_set=_PACK_PAIR_SET,
               StructError=struct.error, INT=_OP_INT, STR=_OP_STR, FLOAT=_OP_FLOAT,
               TUPLE=_OP_TUPLE, SETITEM=_OP_SETITEM):
    if depth > _MAX_DEPTH:
        raise _DumpFail(_Text.DUMP_TOO_DEEP % _MAX_DEPTH)
    w(b"J")
    key = value = None
    depth += 1
    inline = depth <= _MAX_DEPTH  # a tuple value is within the limit: written here
    try:
        try:
            for key, value in obj.items():
                if type(key) is str:
                    data = keys.get(key)
                    w(data if data is not None else _key_bytes(key))
                else:
                    (get(type(key)) or _unknown)(key, w, depth)
                kind = type(value)
                if kind is str:
                    data = value.encode()
                    w(pack_op(STR, len(data)))
                    w(data)
                    w(b"P")
                    continue
                elif kind is int:
                    try:
                        w(int_set(INT, value, SETITEM))
                        continue
                    except StructError:  # beyond 4 bytes: written below
                        pass
                elif kind is float:
                    w(float_set(FLOAT, value, SETITEM))
                    continue
                elif kind is tuple and inline:
                    if len(value) == 2:
                        first, second = value
                        if type(first) is int and type(second) is int:
                            try:
                                w(pair_set(INT, first, INT, second, TUPLE, 2, SETITEM))
                                continue
                            except StructError:  # beyond 4 bytes: _save_tuple
                                pass
                    _save_tuple(value, w, depth)
                    w(b"P")
                    continue
                elif value is None:
                    w(b"LP")
                    continue
                elif kind is bool:
                    w(b"RP" if value else b"CP")
                    continue
                (get(kind) or _unknown)(value, w, depth)
                w(b"P")
        except UnicodeEncodeError:
            _save(key, w, depth)  # one of them raises, naming the str
            _save(value, w, depth)
            raise
    except _DumpFail as fail:
        fail.path.append("[%s]" % _short_repr(key))
        raise


def _save_tuple(obj, w, depth, get=_SAVERS.get, pack_op=_PACK_OP_I4,
                pack_float=_PACK_FLOAT, StructError=struct.error, INT=_OP_INT, STR=_OP_STR,
                FLOAT=_OP_FLOAT, TUPLE=_OP_TUPLE):
    if depth > _MAX_DEPTH:
        raise _DumpFail(_Text.DUMP_TOO_DEEP % _MAX_DEPTH)
    index = 0
    item = None
    depth += 1
    try:
        try:
            for index, item in enumerate(obj):
                kind = type(item)
                if kind is str:
                    data = item.encode()
                    w(pack_op(STR, len(data)))
                    w(data)
                    continue
                elif kind is int:
                    try:
                        w(pack_op(INT, item))
                        continue
                    except StructError:  # beyond 4 bytes: written below
                        pass
                elif kind is float:
                    w(pack_float(FLOAT, item))
                    continue
                (get(kind) or _unknown)(item, w, depth)
        except UnicodeEncodeError:
            _save(item, w, depth)  # raises, naming the str
            raise
    except _DumpFail as fail:
        fail.path.append("[%d]" % index)
        raise
    w(pack_op(TUPLE, len(obj)))


def _save_set(obj, w, depth):
    _save_members(obj, w, depth, b"O")


def _save_frozenset(obj, w, depth):
    _save_members(obj, w, depth, b"E")


def _save_members(obj, w, depth, opcode):
    if depth > _MAX_DEPTH:
        raise _DumpFail(_Text.DUMP_TOO_DEEP % _MAX_DEPTH)
    item = None
    get = _SAVERS.get
    depth += 1
    try:
        for item in obj:
            saver = get(type(item)) or _unknown
            saver(item, w, depth)
    except _DumpFail as fail:
        fail.path.append("{%s}" % _short_repr(item))
        raise
    w(opcode + _pack_i4(len(obj)))


def _save_channel(obj, w, depth):
    w(b"B" + _pack_i4(obj.id))


_SAVERS.update({
    type(None): _save_none,
    bool: _save_bool,
    int: _save_int,
    float: _save_float,
    complex: _save_complex,
    str: _save_str,
    bytes: _save_bytes,
    list: _save_list,
    dict: _save_dict,
    tuple: _save_tuple,
    set: _save_set,
    frozenset: _save_frozenset,
})  # Channel is added in section 5


def dumps(obj):
    """Serialize obj to bytes in execnet's format; DumpError says what and where."""
    out = [_DUMPFORMAT_VERSION]
    w = out.append
    try:
        _save(obj, w, 1)
    except _DumpFail as fail:
        where = "".join(reversed(fail.path))
        raise DumpError(fail.reason + (" at %s" % where if where else "")) from None
    except RecursionError:  # _MAX_DEPTH is reached first, unless the caller is deep
        raise DumpError(
            "can't serialize a recursive or too deeply nested structure"
        ) from None
    w(b"Q")
    return b"".join(out)


def dump(byteio, obj):
    """Write the serialization of obj to a binary file."""
    byteio.write(dumps(obj))


def loads(bytestring, py2str_as_py3str=False, py3str_as_py2str=False):
    """Deserialize bytes made by dumps(); anything else raises LoadError."""
    return _loads(bytestring, None, py2str_as_py3str, py3str_as_py2str)


def load(byteio, py2str_as_py3str=False, py3str_as_py2str=False):
    """Read exactly one serialized object from a binary file."""
    return _loads(_read_one_dump(byteio.read), None, py2str_as_py3str, py3str_as_py2str)


# Bytes following each opcode: a fixed count, or -1 for a 4-byte length + data.
_OPCODE_ARGS = {
    _OP_TUPLE: 4, _OP_BYTES: -1, _OP_CHANNEL: 4, _OP_FALSE: 0, _OP_FLOAT: 8,
    _OP_FROZENSET: 4, _OP_INT: 4, _OP_INT_LEGACY: 4, _OP_BIGINT: -1,
    _OP_BIGINT_LEGACY: -1, _OP_DICT: 0, _OP_LIST: 4, _OP_NONE: 0, _OP_PY2STR: -1,
    _OP_STR: -1, _OP_SET: 4, _OP_SETITEM: 0, _OP_STOP: 0, _OP_TRUE: 0,
    _OP_PY2UNICODE: -1, _OP_COMPLEX: 16,
}


def _read_one_dump(read):
    """Read one dump's bytes from a stream without reading past its end."""

    def exact(n):
        data = read(n)
        if len(data) != n:
            raise LoadError("truncated data: wanted %d bytes, got %d" % (n, len(data)))
        return data

    parts = [exact(1)]
    while True:
        op = exact(1)
        parts.append(op)
        if op == b"Q":
            return b"".join(parts)
        size = _OPCODE_ARGS.get(op[0])
        if size is None:
            raise LoadError("unknown opcode %r" % op)
        if size < 0:
            head = exact(4)
            parts.append(head)
            size = _unpack_i4(head)[0]
            if size < 0:
                raise LoadError("negative length %d" % size)
        parts.append(exact(size))


# Loading takes two paths.  The fast one reads what dumps() writes, by
# recursive descent: a call per list or dict, whose loop reads the common
# items ('F' index or a str key, a scalar or a pair of scalars, 'P') inline.
# The rest of the format is postfix (a tuple's items come before its '@'),
# so anything else in an item goes to _fast_slot, a small stack machine for
# that one item.  Whatever the fast path does not expect (a channel, a
# legacy opcode, a broken or hostile input, a list index out of order...)
# raises _Refuse or some other exception, and the general loop in
# _load_general loads the data again from the start, or says what is wrong.
# So the fast path only needs to be safe, not to explain errors: it refuses
# lengths beyond the data, and more than _MAX_DEPTH levels of its own calls
# (each list, dict and slot is one; this also limits the stack used, even
# on 3.6-3.10, where each Python call takes C stack) or containers deeper
# than _MAX_DEPTH.  Depths are counted as the general loop counts them:
# each list or dict returns the depth of what it holds, the slot keeps
# marks for the containers among its items.  Opcodes and helpers are bound
# as default arguments: local names cost no more than the literal numbers,
# module globals would.

_CONSTANTS = {_OP_NONE: None, _OP_TRUE: True, _OP_FALSE: False}


def _chunk_at(data, pos, end):
    """The length-prefixed bytes at pos, and the position after them."""
    size = _unpack_i4(data, pos)[0]
    stop = pos + 4 + size
    if size < 0 or stop > end:
        raise LoadError("length %d at byte %d exceeds the data" % (size, pos))
    return data[pos + 4:stop], stop


_NOTHING = object()


class _Refuse(Exception):
    """Internal: the fast loader leaves this input to the general loop."""


_SIZE = struct.Struct("!I").unpack_from  # huge lengths run past the end: an IndexError
_OP_I4 = struct.Struct("!Bi").unpack_from  # an opcode and its 4-byte int
_PAIR_END = b"@\x00\x00\x00\x02P"  # a tuple of the last 2 items, stored
# Opcodes where a dict's next key would stand that end the dict: it is put
# into a list or dict, or the data ends; no key is a list or dict.
_ENDS_DICT = frozenset([_OP_SETITEM, _OP_STOP, _OP_DICT, _OP_LIST])


def _fast_list(data, pos, level, INT=_OP_INT, STR=_OP_STR, FLOAT=_OP_FLOAT,
               DICT=_OP_DICT, LIST=_OP_LIST, BYTES=_OP_BYTES, SETITEM=_OP_SETITEM,
               TUPLE=_OP_TUPLE, MAX_DEPTH=_MAX_DEPTH, CONSTANTS=_CONSTANTS,
               op_i4=_OP_I4, unpack_i4=_unpack_i4, unpack_size=_SIZE,
               unpack_double=_DOUBLE.unpack_from, NOTHING=_NOTHING, PAIR_END=_PAIR_END):
    """The list whose 'K' is just before pos: (list, position after it, depth)."""
    size = unpack_i4(data, pos)[0]
    pos += 4
    # every element costs at least 7 bytes ('F' index, value, 'P')
    if size < 0 or size * 7 > len(data) - pos or level > MAX_DEPTH:
        raise _Refuse
    result = [None] * size
    depth = 1
    for _ in range(size):
        op, index = op_i4(data, pos)
        if op != INT:
            raise _Refuse
        start = pos = pos + 5
        op = data[pos]
        if op == INT:
            value = unpack_i4(data, pos + 1)[0]
            pos += 5
        elif op == STR:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            value = data[pos - size:pos].decode()
        elif op == DICT or op == LIST:
            if op == DICT:
                value, pos, inner = _fast_dict(data, pos + 1, level + 1)
            else:
                value, pos, inner = _fast_list(data, pos + 1, level + 1)
            if data[pos] != SETITEM:  # the first item of a tuple, set...
                value, pos, inner = _fast_slot(data, pos, level + 1, 1, [value], [inner])
            if inner >= depth:
                depth = inner + 1
        elif op == FLOAT:
            value = unpack_double(data, pos + 1)[0]
            pos += 9
        elif op == BYTES:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            value = data[pos - size:pos]
        elif op in CONSTANTS:
            value = CONSTANTS[op]
            pos += 1
        else:
            value, pos, inner = _fast_slot(data, pos, level + 1, 1, [], [])
            if inner >= depth:
                depth = inner + 1
        if data[pos] != SETITEM:  # a scalar starts a tuple: most often a pair
            op = data[pos]
            if op == INT:
                second = unpack_i4(data, pos + 1)[0]
                pos += 5
            elif op == STR:
                size = unpack_size(data, pos + 1)[0]
                pos += 5 + size
                second = data[pos - size:pos].decode()
            else:
                second = NOTHING
            if data[pos:pos + 6] == PAIR_END and second is not NOTHING:
                value = (value, second)
                pos += 5
                if depth == 1:
                    depth = 2
            else:  # read again from the start: a longer tuple, or anything
                value, pos = _scalar_tuple(
                    data, pos, [value] if second is NOTHING else [value, second])
                if value is NOTHING or data[pos] != SETITEM:
                    value, pos, inner = _fast_slot(data, start, level + 1, 1, [], [])
                    if inner >= depth:
                        depth = inner + 1
                elif depth == 1:
                    depth = 2
        result[index] = value
        pos += 1
    if depth > MAX_DEPTH:
        raise _Refuse
    return result, pos, depth


def _fast_dict(data, pos, level, INT=_OP_INT, STR=_OP_STR, FLOAT=_OP_FLOAT,
               DICT=_OP_DICT, LIST=_OP_LIST, BYTES=_OP_BYTES, SETITEM=_OP_SETITEM,
               TUPLE=_OP_TUPLE, MAX_DEPTH=_MAX_DEPTH, CONSTANTS=_CONSTANTS,
               ENDS_DICT=_ENDS_DICT, unpack_i4=_unpack_i4, unpack_size=_SIZE,
               unpack_double=_DOUBLE.unpack_from, NOTHING=_NOTHING, PAIR_END=_PAIR_END):
    """The dict whose 'J' is just before pos: (dict, position after it, depth)."""
    # The value cases repeat _fast_list's on purpose: a shared function
    # would cost a call per item on the loader's hottest path.
    if level > MAX_DEPTH:
        raise _Refuse
    result = {}
    depth = 1
    while True:
        keystart = pos
        op = data[pos]
        if op == STR:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            key = data[pos - size:pos].decode()
        elif op == INT:
            key = unpack_i4(data, pos + 1)[0]
            pos += 5
        elif op in ENDS_DICT:
            break
        else:
            found, pos, inner = _fast_slot(data, pos, level + 1, 2, [], [])
            if found is NOTHING:
                pos = keystart
                break
            key, value = found
            if inner >= depth:
                depth = inner + 1
            result[key] = value
            pos += 1
            continue
        start = pos
        op = data[pos]
        if op == INT:
            value = unpack_i4(data, pos + 1)[0]
            pos += 5
        elif op == STR:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            value = data[pos - size:pos].decode()
        elif op == DICT or op == LIST:
            if op == DICT:
                value, pos, inner = _fast_dict(data, pos + 1, level + 1)
            else:
                value, pos, inner = _fast_list(data, pos + 1, level + 1)
            if data[pos] != SETITEM:
                (key, value), pos, inner = _fast_slot(
                    data, pos, level + 1, 2, [key, value], [1 << 10 | inner])
            if inner >= depth:
                depth = inner + 1
        elif op == FLOAT:
            value = unpack_double(data, pos + 1)[0]
            pos += 9
        elif op == BYTES:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            value = data[pos - size:pos]
        elif op in CONSTANTS:
            value = CONSTANTS[op]
            pos += 1
        else:
            found, pos, inner = _fast_slot(data, pos, level + 1, 2, [key], [])
            if found is NOTHING:
                pos = keystart
                break
            key, value = found
            if inner >= depth:
                depth = inner + 1
        if data[pos] != SETITEM:  # a scalar starts a tuple: most often a pair
            op = data[pos]
            if op == INT:
                second = unpack_i4(data, pos + 1)[0]
                pos += 5
            elif op == STR:
                size = unpack_size(data, pos + 1)[0]
                pos += 5 + size
                second = data[pos - size:pos].decode()
            else:
                second = NOTHING
            if data[pos:pos + 6] == PAIR_END and second is not NOTHING:
                value = (value, second)
                pos += 5
                if depth == 1:
                    depth = 2
            else:  # read again from the start: a longer tuple, or anything
                value, pos = _scalar_tuple(
                    data, pos, [value] if second is NOTHING else [value, second])
                if value is NOTHING or data[pos] != SETITEM:
                    found, pos, inner = _fast_slot(data, start, level + 1, 2, [key], [])
                    if found is NOTHING:
                        pos = keystart
                        break
                    key, value = found
                    if inner >= depth:
                        depth = inner + 1
                elif depth == 1:
                    depth = 2
        result[key] = value
        pos += 1
    if depth > MAX_DEPTH:
        raise _Refuse
    return result, pos, depth


def _scalar_tuple(data, pos, items, INT=_OP_INT, STR=_OP_STR, FLOAT=_OP_FLOAT,
                  TUPLE=_OP_TUPLE, CONSTANTS=_CONSTANTS, unpack_i4=_unpack_i4,
                  unpack_size=_SIZE, unpack_double=_DOUBLE.unpack_from):
    """(tuple, position after it) if pos continues a tuple of ints, strs,
    floats, None or bools, whose first items are items; else (_NOTHING, pos)."""
    start = pos
    while True:
        op = data[pos]
        if op == INT:
            items.append(unpack_i4(data, pos + 1)[0])
            pos += 5
        elif op == STR:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            items.append(data[pos - size:pos].decode())
        elif op == FLOAT:
            items.append(unpack_double(data, pos + 1)[0])
            pos += 9
        elif op in CONSTANTS:
            items.append(CONSTANTS[op])
            pos += 1
        elif op == TUPLE and unpack_i4(data, pos + 1)[0] == len(items):
            return tuple(items), pos + 5
        else:
            return _NOTHING, start


def _fast_slot(data, pos, level, count, items, marks, INT=_OP_INT, STR=_OP_STR,
               FLOAT=_OP_FLOAT, DICT=_OP_DICT, LIST=_OP_LIST, BYTES=_OP_BYTES,
               SETITEM=_OP_SETITEM, STOP=_OP_STOP, TUPLE=_OP_TUPLE, SET=_OP_SET,
               FROZENSET=_OP_FROZENSET, COMPLEX=_OP_COMPLEX, BIGINT=_OP_BIGINT,
               MAX_DEPTH=_MAX_DEPTH, CONSTANTS=_CONSTANTS, unpack_i4=_unpack_i4,
               unpack_size=_SIZE, unpack_double=_DOUBLE.unpack_from):
    """Run the program from pos on, with items on the stack, to the 'P' that
    ends a list element (count 1) or a dict item (count 2), or to the final
    'Q' (count 0).  marks holds index << 10 | depth of each container among
    the items, in order.  Returns (the value, or [key, value]; the position
    of that 'P' or 'Q'; the largest depth in it)."""
    push = items.append
    recursed = bool(marks)
    while True:
        op = data[pos]
        if op == INT:
            push(unpack_i4(data, pos + 1)[0])
            pos += 5
        elif op == STR:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            push(data[pos - size:pos].decode())
        elif op == TUPLE or op == SET or op == FROZENSET:
            size = unpack_i4(data, pos + 1)[0]
            pos += 5
            start = len(items) - size
            if size < 0 or start < 0:
                if count == 2 and start < 0 <= size and not recursed:
                    # what looked like a dict item is the dict's siblings
                    # in a tuple (set...), and has no list or dict inside:
                    # cheap to read again
                    return _NOTHING, pos, 0
                raise _Refuse
            depth = 1
            while marks and marks[-1] >= start << 10:  # a container among the items
                inner = (marks.pop() & 1023) + 1
                if inner > depth:
                    depth = inner
            if depth > MAX_DEPTH:  # before set() and frozenset() hash the items
                raise _Refuse
            value = (tuple if op == TUPLE else set if op == SET else frozenset)(items[start:])
            del items[start:]
            marks.append(start << 10 | depth)
            push(value)
        elif op == FLOAT:
            push(unpack_double(data, pos + 1)[0])
            pos += 9
        elif op in CONSTANTS:
            push(CONSTANTS[op])
            pos += 1
        elif op == DICT or op == LIST:
            if op == DICT:
                value, pos, depth = _fast_dict(data, pos + 1, level + 1)
            else:
                value, pos, depth = _fast_list(data, pos + 1, level + 1)
            marks.append(len(items) << 10 | depth)
            push(value)
            recursed = True
        elif op == SETITEM or op == STOP:
            if len(items) != (count or 1) or (op == STOP) != (count == 0):
                raise _Refuse
            depth = 0
            for inner in marks:
                if inner & 1023 > depth:
                    depth = inner & 1023
            return (items if count == 2 else items[0]), pos, depth
        elif op == BYTES:
            size = unpack_size(data, pos + 1)[0]
            pos += 5 + size
            push(data[pos - size:pos])
        elif op == COMPLEX:
            real, imag = _COMPLEX.unpack_from(data, pos + 1)
            push(complex(real, imag))
            pos += 17
        elif op == BIGINT:
            size = unpack_size(data, pos + 1)[0]
            if size > _MAX_INT_DIGITS:  # the general loop says why
                raise _Refuse
            pos += 5 + size
            push(_ascii_to_int(data[pos - size:pos]))
        else:
            raise _Refuse


def _load_fast(data):
    """The value in data (bytes, version byte checked) if it has the shape
    dumps() gives; else an exception (_Refuse, IndexError...)."""
    value, pos, depth = _fast_slot(data, 1, 0, 0, [], [])
    if pos + 1 != len(data):
        raise _Refuse
    return value


def _loads(data, channel_factory=None, py2str_as_py3str=False, py3str_as_py2str=False):
    """Load one value from data; channels are made with channel_factory(id),
    which must give the same channel for the same id (the fast path may have
    made one before it refused)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("loads() needs bytes, not %s" % type(data).__name__)
    data = bytes(data)
    if data[:1] != _DUMPFORMAT_VERSION:
        raise LoadError("not serialized data: version byte is %r, expected %r" % (
            data[:1], _DUMPFORMAT_VERSION))
    if not py3str_as_py2str:  # the fast path makes str of 'N'
        try:
            return _load_fast(data)
        except Exception:
            pass  # the general loop loads it, or says what is wrong
    return _load_general(data, channel_factory, py2str_as_py3str, py3str_as_py2str)


def _load_general(data, channel_factory, py2str_as_py3str, py3str_as_py2str,
                  INT=_OP_INT, INT_LEGACY=_OP_INT_LEGACY, SETITEM=_OP_SETITEM,
                  STR=_OP_STR, BYTES=_OP_BYTES, FLOAT=_OP_FLOAT, TUPLE=_OP_TUPLE,
                  SET=_OP_SET, FROZENSET=_OP_FROZENSET, LIST=_OP_LIST, DICT=_OP_DICT,
                  BIGINT=_OP_BIGINT, BIGINT_LEGACY=_OP_BIGINT_LEGACY, PY2STR=_OP_PY2STR,
                  PY2UNICODE=_OP_PY2UNICODE, COMPLEX=_OP_COMPLEX, CHANNEL=_OP_CHANNEL,
                  STOP=_OP_STOP, MAX_DEPTH=_MAX_DEPTH):
    """The stack machine for any data (bytes, version byte checked): loads
    what the fast path refused, or raises LoadError saying what is wrong."""
    end = len(data)
    pos = 1
    stack = []
    push = stack.append
    pop = stack.pop
    make_str = not py3str_as_py2str
    # One entry per container on the stack, in stack order: its position
    # << 10 | its depth so far (_MAX_DEPTH < 1024), above a sentinel.  A
    # container on the stack is in no other container yet, and leaves the
    # stack when it is put into one, so depths only change here.  A 'P'
    # that replaces an item keeps the old item's depth: an overestimate
    # that only hostile input can cause.
    marks = [-1]
    try:
        while True:
            op = data[pos]
            pos += 1
            if op == INT or op == INT_LEGACY:
                push(_unpack_i4(data, pos)[0])
                pos += 4
            elif op == SETITEM:
                value = pop()
                key = pop()
                stack[-1][key] = value
                top = len(stack) << 10
                if marks[-1] >= top:  # the value or the key is a container
                    depth = (marks.pop() & 1023) + 1
                    if marks[-1] >= top:  # both are
                        inner = (marks.pop() & 1023) + 1
                        if inner > depth:
                            depth = inner
                    # the setitem worked, so stack[-1] is a list or dict and
                    # marks[-1] is its entry
                    if depth > marks[-1] & 1023:
                        if depth > MAX_DEPTH:
                            raise LoadError(_Text.LOAD_TOO_DEEP % (MAX_DEPTH, pos - 1))
                        marks[-1] = top - 1024 | depth
            elif op == STR or op == BYTES:
                size = _unpack_i4(data, pos)[0]
                pos += 4
                if size < 0 or pos + size > end:
                    raise LoadError("length %d at byte %d exceeds the data" % (size, pos - 4))
                chunk = data[pos:pos + size]
                pos += size
                push(chunk.decode("utf-8") if op == STR and make_str else chunk)
            elif op in _CONSTANTS:  # 'L', 'R', 'C'
                push(_CONSTANTS[op])
            elif op == FLOAT:
                push(_DOUBLE.unpack_from(data, pos)[0])
                pos += 8
            elif op == TUPLE or op == SET or op == FROZENSET:
                size = _unpack_i4(data, pos)[0]
                pos += 4
                top = len(stack)
                if size < 0 or size > top:
                    raise LoadError("collection of %d items at byte %d, stack has %d" % (
                        size, pos - 4, top))
                # entries of items are >= the new one's: depths are >= 1
                entry = (top - size) << 10 | 1
                if marks[-1] >= entry:  # some items are containers
                    depth = 0
                    while marks[-1] >= entry:
                        inner = marks.pop() & 1023
                        if inner > depth:
                            depth = inner
                    # checked before set() and frozenset() hash the items
                    if depth >= MAX_DEPTH:
                        raise LoadError(_Text.LOAD_TOO_DEEP % (MAX_DEPTH, pos - 5))
                    entry += depth
                kind = tuple if op == TUPLE else set if op == SET else frozenset
                if size:
                    items = kind(stack[-size:])
                    del stack[-size:]
                else:
                    items = kind()
                push(items)
                marks.append(entry)
            elif op == LIST:
                size = _unpack_i4(data, pos)[0]
                pos += 4
                # every element costs at least 7 bytes ('F' index, value, 'P')
                if size < 0 or size * 7 > end - pos:
                    raise LoadError("list length %d at byte %d exceeds the data" % (size, pos - 4))
                marks.append(len(stack) << 10 | 1)
                push([None] * size)
            elif op == DICT:
                marks.append(len(stack) << 10 | 1)
                push({})
            elif op == BIGINT or op == BIGINT_LEGACY or op == PY2STR or op == PY2UNICODE:
                chunk, pos = _chunk_at(data, pos, end)
                if op == BIGINT or op == BIGINT_LEGACY:
                    digits = len(chunk) - (chunk[:1] in (b"-", b"+"))
                    if digits > _MAX_INT_DIGITS:
                        raise LoadError(_Text.LOAD_INT_TOO_LONG % (
                            digits, pos - len(chunk) - 5, _MAX_INT_DIGITS))
                    push(_ascii_to_int(chunk))
                elif op == PY2UNICODE or py2str_as_py3str:
                    push(chunk.decode("utf-8" if op == PY2UNICODE else "latin-1"))
                else:
                    push(chunk)
            elif op == COMPLEX:
                real, imag = _COMPLEX.unpack_from(data, pos)
                push(complex(real, imag))
                pos += 16
            elif op == CHANNEL:
                if channel_factory is None:
                    raise LoadError("data contains a channel but there is no gateway")
                push(channel_factory(_unpack_i4(data, pos)[0]))
                pos += 4
            elif op == STOP:
                break
            else:
                raise LoadError("unknown opcode %r at byte %d" % (bytes([op]), pos - 1))
    except LoadError:
        raise
    except IndexError:
        raise LoadError("truncated or malformed data near byte %d of %d" % (pos, end)) from None
    except Exception as exc:
        raise LoadError("malformed data near byte %d: %s: %s" % (
            pos, type(exc).__name__, exc)) from None
    if pos != end:
        raise LoadError("%d bytes of garbage after the end of the data" % (end - pos))
    if len(stack) != 1:
        raise LoadError("malformed data: %d values left, expected 1" % len(stack))
    return stack[0]


# === 4. Framing and byte streams ===
#
# Frame: 9-byte header then payload.
#
#   offset  size  field
#   0       1     message code (_MSG_*)
#   1       4     channel id (unsigned, big-endian); the fd for _MSG_OUTPUT
#   5       4     payload length (unsigned, big-endian), at most _MAX_PAYLOAD
#
# Items larger than _CHUNK travel as _MSG_DATA_PART frames closed by one
# _MSG_DATA frame, so other channels' frames interleave with a big item.
# Flow control: the receiver of data acknowledges consumed bytes with
# _MSG_ACK (payload: 4-byte count); a sender keeps at most `window` bytes
# unacknowledged per channel.

_HEADER = struct.Struct("!BII")
_HEADER_SIZE = _HEADER.size
_COUNT = struct.Struct("!I")

_MSG_STATUS = 0          # ask for remote_status (reply on the channel id)
_MSG_RECONFIGURE = 1     # execnet's py2 string config: accepted, no effect
_MSG_TERMINATE = 2       # the other side should shut down
_MSG_EXEC = 3            # payload: (source, filename, call_name, kwargs)
_MSG_DATA = 4            # payload: one serialized item (or its last piece)
_MSG_CLOSE = 5           # the sender closed the channel
_MSG_CLOSE_ERROR = 6     # closed with an error text
_MSG_LAST_MESSAGE = 7    # the sender will send no more, but still receives
_MSG_DATA_PART = 8       # a non-final piece of a large item
_MSG_ACK = 9             # payload: count of data bytes consumed
_MSG_OUTPUT = 10         # remote stdout/stderr bytes; channel id is the fd
_MSG_READY = 11          # bootstrap done; payload: serialized rinfo dict
_MSG_STACKS = 12         # to the remote: send every thread's stack (on the
                         # channel id); from it, id 0: its stacks at exit
_LAST_MSGCODE = 12

_CHUNK = 256 * 1024
_MAX_PAYLOAD = 1024 * 1024
_DEFAULT_WINDOW = 16 * 1024 * 1024
_READ_SIZE = 64 * 1024
# A pipe that carries a large item is widened to _PIPE_SIZE (Linux): with
# the default 64 KiB pipe, bulk data costs a thread switch on both ends
# every 64 KiB, which made 1 MiB items three to five times slower than
# execnet's.  Reads stay at _READ_SIZE: a larger buffer is a fresh mmap()
# per read, which cost small messages a quarter of their round trip.
_PIPE_SIZE = 256 * 1024
_MAX_ITEM = 1024 * 1024 * 1024   # largest item received; the xspec key max_item= overrides


def _encode_frame(msgcode, channelid, payload=b""):
    """One frame as bytes."""
    return _HEADER.pack(msgcode, channelid, len(payload)) + payload


class _Pieces(list):
    """A large frame's item data: views of the reads it arrived in."""

    __slots__ = ("size",)

    def __init__(self, views, size):
        list.__init__(self, views)
        self.size = size

    def __len__(self):
        return self.size


class _FrameReader:
    """Turns a byte stream, fed in pieces of any size, into frames.

    A frame's payload is bytes, except that of a large _MSG_DATA or
    _MSG_DATA_PART frame: _Pieces, whose len() is the payload's size.
    """

    def __init__(self):
        self._buf = b""
        self._head = None    # (code, cid) of a large frame being collected
        self._pending = []   # its payload so far, in pieces
        self._pending_len = 0
        self._need = 0       # its payload length

    def feed(self, data):
        """Add data; return the list of (msgcode, channelid, payload) now complete."""
        frames = []
        if self._head is not None:
            # a large payload: keep views of the pieces and join them once
            # (the payload's only copy)
            missing = self._need - self._pending_len
            if len(data) < missing:
                self._pending.append(data)
                self._pending_len += len(data)
                return frames
            view = memoryview(data)
            self._pending.append(view[:missing])
            frames.append(self._head + (self._payload(),))
            self._head = None
            self._pending = []
            if len(data) == missing:
                return frames
            data = view[missing:]
        buf = self._buf + data if self._buf else data
        pos = 0
        size = len(buf)
        unpack = _HEADER.unpack_from
        while size - pos >= _HEADER_SIZE:
            code, cid, length = unpack(buf, pos)
            if code > _LAST_MSGCODE or length > _MAX_PAYLOAD:
                raise LoadError(
                    "corrupt frame header %r at stream offset +%d (garbage on the stream?)"
                    % (bytes(buf[pos:pos + _HEADER_SIZE]), pos))
            start = pos + _HEADER_SIZE
            end = start + length
            if end > size:
                if length > _READ_SIZE:
                    self._head = (code, cid)
                    self._pending = [memoryview(buf)[start:]]
                    self._pending_len = size - start
                    self._need = length
                    pos = size
                break
            frames.append((code, cid, bytes(buf[start:end])))
            pos = end
        self._buf = bytes(buf[pos:]) if pos < size else b""
        return frames

    def _payload(self):
        """The large payload just completed: item data stays in pieces (the
        item is joined from them once, by _join_pieces), the rest is joined."""
        if self._head[0] in (_MSG_DATA, _MSG_DATA_PART):
            return _Pieces(self._pending, self._need)
        return b"".join(self._pending)

    def leftover(self):
        """Bytes fed but not yet returned as frames."""
        if self._head is None:
            return self._buf
        head = _HEADER.pack(self._head[0], self._head[1], self._need)
        return head + b"".join(self._pending)


class _IO:
    """The byte stream under a gateway: the contract every transport fulfils.

    read()           next bytes; b"" once the stream ended (never raises)
    write(data)      all of data; OSError once the peer is gone
    writev(buffers)  all of the buffers, in order (one call where possible)
    close_write()    end of stream for the peer (idempotent)
    close_read()     release the read side, once nobody reads any more
    kill()           make the remote go now; unblocks read() and write()
    wait(timeout)    the remote's exit status; None while running or unknown
    handshake()      the transport's own step before any source is sent
    widen()          large items will pass: enlarge kernel buffers if useful
    set_output_handler(handler)  pass bytes the remote writes beside the
                     stream (a process's stderr) to handler(bytes)
    output_text()    what arrived beside the stream so far, for error messages
    death_reason()   why the stream ended, as far as the transport knows
    remoteaddress    where the remote runs, for users
    session          after handshake(): the keys and interpreter of a
                     session to seal (_SealedIO), or None
    """

    remoteaddress = ""
    session = None
    _read_error = None

    def handshake(self):
        """No step of its own before the bootstrap."""

    def widen(self):
        """Nothing to enlarge."""

    def writev(self, buffers):
        for data in buffers:
            self.write(data)

    def set_output_handler(self, handler):
        """Nothing arrives beside the stream."""

    def output_text(self, timeout=0.0):
        return ""

    def wait(self, timeout=0.0):
        return None

    def death_reason(self):
        if self._read_error is not None:
            return "read failed: %s" % (self._read_error,)
        status = self.wait(0.2)
        if status is None:
            return ""
        if status < 0:
            return "remote process %s was killed by signal %d" % (self.remoteaddress, -status)
        return "remote process %s exited with status %d" % (self.remoteaddress, status)


def _widen_pipe(fd):
    """Give the pipe behind fd a _PIPE_SIZE buffer if it is smaller (Linux).

    Only pipes that carry a large item are widened, on their first one
    (_GatewayBase._send calls _IO.widen()):
    pipe memory counts against a per-user limit (fs.pipe-user-pages-soft),
    and a program with a hundred quiet gateways should not use it up.
    Anything else (a socket, another system, the limit reached) keeps
    its buffer.
    """
    if not sys.platform.startswith("linux"):
        return
    import fcntl

    try:  # F_GETPIPE_SZ and F_SETPIPE_SZ (named in fcntl only from 3.10)
        if fcntl.fcntl(fd, 1032) < _PIPE_SIZE:
            fcntl.fcntl(fd, 1031, _PIPE_SIZE)
    except OSError:
        pass


class _FdIO(_IO):
    """A byte stream over two file descriptors (pipes)."""

    _widened = False

    def __init__(self, rfd, wfd):
        self.rfd = rfd
        self.wfd = wfd

    def read(self):
        """Return the next available bytes, b'' at end of stream."""
        try:
            return os.read(self.rfd, _READ_SIZE)
        except OSError as exc:
            import errno

            if self.rfd >= 0 and exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF):
                self._read_error = exc
                _log(40, "read from %s failed: %s" % (self.remoteaddress or "stream", exc))
            return b""

    def write(self, data):
        """Write all of data (raises OSError when the peer is gone)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def writev(self, buffers):
        """Write all of buffers, in one system call if the pipe takes them."""
        if not hasattr(os, "writev"):
            return _IO.writev(self, buffers)
        views = [memoryview(data) for data in buffers]
        while views:
            written = os.writev(self.wfd, views)
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if written:
                views[0] = views[0][written:]

    def widen(self):
        """Widen the pipe we write to (once)."""
        if not self._widened:
            self._widened = True
            _widen_pipe(self.wfd)

    def close_write(self):
        """Signal end of stream to the peer."""
        fd, self.wfd = self.wfd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def close_read(self):
        """Stop reading."""
        fd, self.rfd = self.rfd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def kill(self):
        """A bare pipe pair has no process to kill: end both directions."""
        self.close_write()


# --- Sealed streams: plain-TCP socket sessions ---
#
# A socket session over plain TCP (section 9: the handshake gives both ends
# one key per direction) carries its bytes in records, so that a relay on
# the path can neither inject, drop, reorder, replay nor truncate unseen:
#
#   offset  size  field
#   0       4     length word (unsigned, big-endian): payload size, at most
#                 _RECORD_MAX; the top bit (_RECORD_END) marks the end record
#                 (payload size 0) that close_write() sends
#   4       n     payload: stream bytes
#   4+n     16    tag over seq + length word + payload, under the direction
#                 key: for n <= _SMALL_RECORD (256), BLAKE2s in its keyed
#                 (MAC) mode with digest size 16; for larger n, the first
#                 16 bytes of HMAC-SHA256.  seq is the record's number in
#                 its direction, 8 bytes big-endian, from 0
#
# The first record the client sends (seq 0) is the bootstrap itself, up to
# _BOOT_RECORD_MAX bytes (see _STAGE1_SEALED).  A reader hands on no byte of
# a record before its tag is checked, refuses a length beyond the bound
# before reading the payload, and tells an end of stream without the end
# record (cut or truncated) from a clean end.
#
# Two MACs, chosen by the authenticated length: a round trip's messages are
# small, and keyed BLAKE2s takes one pass and one digest where HMAC takes
# two (0.41 against 0.71 us for 60 bytes, 3.11); bulk goes through SHA-256,
# which CPUs with SHA extensions hash 3x faster than BLAKE2s (1.7 against
# 0.5 GiB/s here).

_RECORD = struct.Struct("!I")
_SEQ = struct.Struct("!Q")
_SEQ_RECORD = struct.Struct("!QI")
_RECORD_MAX = _CHUNK + _HEADER_SIZE   # one full data frame per record
_RECORD_END = 0x80000000
_BOOT_RECORD_MAX = 64 * 1024 * 1024
_TAG_SIZE = 16
_SMALL_RECORD = 256   # payloads up to this size are tagged with BLAKE2s
_SEAL_STATUS = 5   # exit status of a session whose stream failed its check


def _record_macs(key):
    """A direction's MAC states, copied per record: keyed BLAKE2s (small
    records), and HMAC-SHA256 of key (at most 64 bytes) as its two padded
    hash states (half the cost of hmac.HMAC.copy())."""
    import hashlib

    pad = key.ljust(64, b"\0")
    return (hashlib.blake2s(key=key, digest_size=_TAG_SIZE),
            hashlib.sha256(bytes(byte ^ 0x36 for byte in pad)),
            hashlib.sha256(bytes(byte ^ 0x5C for byte in pad)))


class _SealedIO(_IO):
    """An _IO whose bytes travel in authenticated records (see the table
    above) over an inner _IO; everything but the bytes is the inner one's."""

    def __init__(self, inner, read_key, write_key, peer, read_seq=0, write_seq=0):
        import hmac

        self._inner = inner
        self.remoteaddress = inner.remoteaddress
        self.session = inner.session
        self._peer = peer
        self._rsmall, self._rin, self._rout = _record_macs(read_key)
        self._wsmall, self._win, self._wout = _record_macs(write_key)
        self._compare = hmac.compare_digest
        self._rseq = read_seq
        self._wseq = write_seq
        self._wlock = threading.Lock()
        self._wended = False
        self._buf = b""
        self._ready = []       # verified payloads not yet returned
        self._large = None     # a large record in progress: [mac, pieces, missing, tag, size]
        self._ended = False
        self._broken = None

    # -- writing --

    def _seal(self, buffers, size, out, end=False):
        """Append one record of buffers (size bytes in all) to out (lock held)."""
        head = _SEQ_RECORD.pack(self._wseq, _RECORD_END if end else size)
        self._wseq += 1
        mac = (self._wsmall if size <= _SMALL_RECORD else self._win).copy()
        mac.update(head)
        for data in buffers:
            mac.update(data)
        out.append(head[8:])
        out.extend(buffers)
        out.append(self._finish(mac, size, self._wout))

    @staticmethod
    def _finish(mac, size, outer):
        """The tag of a record of size bytes whose MAC state is mac."""
        if size <= _SMALL_RECORD:
            return mac.digest()
        outer = outer.copy()
        outer.update(mac.digest())
        return outer.digest()[:_TAG_SIZE]

    def write(self, data):
        """Send data in records (OSError once the peer is gone)."""
        size = len(data)
        if size > _RECORD_MAX:
            return self.writev((data,))
        with self._wlock:   # (the hot path: _seal inlined)
            if self._wended:
                raise BrokenPipeError("stream to %s closed for writing" % self._peer)
            head = _SEQ_RECORD.pack(self._wseq, size)
            self._wseq += 1
            if size <= _SMALL_RECORD:
                mac = self._wsmall.copy()
                mac.update(head)
                mac.update(data)
                self._inner.write(head[8:] + data + mac.digest())
                return
            mac = self._win.copy()
            mac.update(head)
            mac.update(data)
            outer = self._wout.copy()
            outer.update(mac.digest())
            self._inner.write(head[8:] + data + outer.digest()[:_TAG_SIZE])

    def writev(self, buffers):
        """Send buffers in records of at most _RECORD_MAX bytes, MACed piece
        by piece and written together (no joining of large buffers)."""
        with self._wlock:
            if self._wended:
                raise BrokenPipeError("stream to %s closed for writing" % self._peer)
            out = []
            record, size = [], 0
            for data in buffers:
                view = memoryview(data)
                while len(view):
                    take = view[:_RECORD_MAX - size]
                    record.append(take)
                    size += len(take)
                    view = view[len(take):]
                    if size == _RECORD_MAX:
                        self._seal(record, size, out)
                        record, size = [], 0
            if record:
                self._seal(record, size, out)
            self._inner.writev(out)

    def write_boot(self, buffers):
        """The client's bootstrap: buffers as the one first record (seq 0)."""
        with self._wlock:
            out = []
            self._seal(buffers, sum(map(len, buffers)), out)
            self._inner.writev(out)

    def close_write(self):
        """Send the end record, then end the stream.  No end record once
        the other direction failed its check (the peer sees a cut stream,
        not a clean end), nor while a writer is stuck."""
        if self._wlock.acquire(timeout=1.0):
            try:
                if not self._wended and self._broken is None:
                    self._wended = True
                    out = []
                    self._seal((), 0, out, end=True)
                    try:
                        self._inner.write(b"".join(out))
                    except (OSError, ValueError):
                        pass
            finally:
                self._wlock.release()
        self._wended = True
        self._inner.close_write()

    # -- reading --

    def read(self):
        """Verified payload bytes; b'' after the end record.  Raises
        _StreamError when the stream fails its check (and from then on)."""
        ready = self._ready
        while not ready:
            if self._broken is not None:
                raise _StreamError(self._broken)
            if self._ended:
                return b""
            data = self._inner.read()
            if not data:
                self._ended = True
                if self._buf or self._large is not None:
                    self._fail(_Text.SEAL_CUT_RECORD)
                self._fail(_Text.SEAL_NO_END)
            # The hot path (a round trip's reply): data is exactly one whole
            # data record and nothing is pending; checked here, its payload
            # returned as it is.  Anything else goes through _feed.
            end = len(data) - _TAG_SIZE
            if self._buf or self._large is not None or end <= 4 or \
                    _RECORD.unpack_from(data)[0] != end - 4 or end - 4 > _RECORD_MAX:
                self._feed(data)
                continue
            small = end - 4 <= _SMALL_RECORD
            mac = (self._rsmall if small else self._rin).copy()
            mac.update(_SEQ.pack(self._rseq))
            mac.update(data[:end])
            if small:
                tag = mac.digest()
            else:
                outer = self._rout.copy()
                outer.update(mac.digest())
                tag = outer.digest()[:_TAG_SIZE]
            if not self._compare(tag, data[end:]):
                self._fail(_Text.SEAL_BAD_TAG % self._rseq)
            self._rseq += 1
            return data[4:end]
        return ready.pop(0)

    def _fail(self, what):
        self._broken = _Text.SEAL_BROKEN % (self._peer, what)
        raise _StreamError(self._broken)

    def _verify(self, mac, size, tag):
        if not self._compare(self._finish(mac, size, self._rout), tag):
            self._fail(_Text.SEAL_BAD_TAG % self._rseq)
        self._rseq += 1

    def _feed(self, data):
        large = self._large
        if large is not None:   # continue a large record
            take = min(large[2], len(data))
            if take:
                piece = data if take == len(data) else data[:take]
                large[0].update(piece)
                large[1].append(piece)
                large[2] -= take
            if large[2]:
                return
            need = _TAG_SIZE - len(large[3])
            large[3] += data[take:take + need]
            if len(large[3]) < _TAG_SIZE:
                return
            self._large = None
            self._verify(large[0], large[4], large[3])
            self._ready.extend(large[1])
            data = data[take + need:]
            if not data:
                return
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        ready = self._ready
        while size - pos >= 4:
            word = _RECORD.unpack_from(buf, pos)[0]
            length = word & 0x7FFFFFFF
            if length > _RECORD_MAX or (word & _RECORD_END and length):
                self._fail(_Text.SEAL_BAD_LENGTH % (self._rseq, word))
            stop = pos + 4 + length + _TAG_SIZE
            mac = (self._rsmall if length <= _SMALL_RECORD else self._rin).copy()
            mac.update(_SEQ.pack(self._rseq))
            if stop > size:
                if length > _READ_SIZE:   # collect it piece by piece
                    view = memoryview(buf)
                    part = bytes(view[pos + 4:min(size, pos + 4 + length)])
                    mac.update(view[pos:pos + 4])
                    mac.update(part)
                    self._large = [mac, [part] if part else [], length - len(part),
                                   bytes(view[pos + 4 + length:size]), length]
                    pos = size
                break
            end = stop - _TAG_SIZE
            mac.update(buf[pos:end])   # (_verify without its call: the hot path)
            tag = mac.digest() if length <= _SMALL_RECORD else self._finish(mac, length, self._rout)
            if not self._compare(tag, buf[end:stop]):
                self._fail(_Text.SEAL_BAD_TAG % self._rseq)
            self._rseq += 1
            if word & _RECORD_END:
                self._ended = True   # (nothing after it is read)
                pos = size
                break
            if length:
                ready.append(buf[pos + 4:end])
            pos = stop
        self._buf = buf[pos:] if pos < size else b""

    def drain(self, timeout):
        """Read and drop what the peer still sends (its end record, after
        _MSG_TERMINATE), until its end or timeout: a socket closed with
        unread input is reset, and the reset can discard our last bytes
        before the peer has read them."""
        import select
        import time

        rfd = getattr(self._inner, "rfd", -1)
        deadline = time.time() + timeout
        while rfd >= 0:
            remaining = deadline - time.time()
            try:
                if remaining <= 0 or not select.select([rfd], [], [], remaining)[0]:
                    return
                if not os.read(rfd, _READ_SIZE):
                    return
            except (OSError, ValueError):
                return

    # -- the rest is the inner stream's --

    def close_read(self):
        self._inner.close_read()

    def kill(self):
        self._inner.kill()

    def wait(self, timeout=0.0):
        return self._inner.wait(timeout)

    def handshake(self):
        """(Done by the inner stream before it was sealed.)"""

    def widen(self):
        self._inner.widen()

    def set_output_handler(self, handler):
        self._inner.set_output_handler(handler)

    def output_text(self, timeout=0.0):
        return self._inner.output_text(timeout)

    def death_reason(self):
        return self._broken or self._inner.death_reason()


# === 5. Channels ===
#
# Where sections 5 and 6 rely on the GIL for atomicity (free-threaded
# builds are not supported; these notes say what such a port must look at):
#   - _Flow.arrived: one writer (the receiver thread) adds without the lock,
#     and item_arrived reads `eager` right after; without a GIL the pair is
#     taken under the lock (_NO_GIL below: under a GIL that lock would cost
#     about 0.5 us an item, measured on 3.11).
#   - _Flow.fits() reads `unacked` unlocked; its callers hold the lock.
#   - _Flow.parts / parts_size: touched by the receiver thread only.
#   - Gateway._channels (a WeakValueDictionary) and Gateway._callbacks: the
#     receiver thread pops and gets without _chanlock while other threads
#     add under it; single dict operations, atomic under the GIL.
#   - Channel._items: a SimpleQueue (thread-safe by itself); the callback
#     swap sets it to None under the gateway's _receivelock.
#   - Channel ids come from Gateway._count under _chanlock: no GIL needed.
# With a GIL, _NO_GIL is False and nothing above takes a lock it did not.
_NO_GIL = not getattr(sys, "_is_gil_enabled", lambda: True)()

_ENDMARKER = object()
_NO_ENDMARKER_WANTED = object()
# A bytes item's serialized head (then a 4-byte length) and its last byte.
_BYTES_HEAD = _DUMPFORMAT_VERSION + bytes([_OP_BYTES])
_STOP_BYTE = bytes([_OP_STOP])


class _Flow:
    """Flow-control accounting of one channel, in both directions.

    Sending: at most `window` bytes may be unacknowledged by the peer.
    Receiving: bytes are acknowledged once the program has read them, in
    batches of `threshold`.  Two exceptions keep programs that complete on
    execnet from hanging: while a thread waits in waitclose() or a local
    sender on this channel waits for credit ("eager"), data is acknowledged
    on arrival; and pieces of a large item are acknowledged on arrival while
    no whole item waits unread, so one item may be larger than the window.

    The methods below return how many bytes to acknowledge now (0: none);
    the caller sends that, outside the lock.  `arrived` has one writer, the
    receiver thread, so an item's arrival takes no lock unless someone is
    eager (item_arrived's order, add first and then look, makes that safe).
    """

    def __init__(self, window, threshold):
        self.lock = threading.Lock()   # C-level, for the hot paths
        self.cond = threading.Condition(self.lock)  # senders wait on it
        self.window = window
        self.threshold = threshold
        self.unacked = 0    # sent, not yet acknowledged by the peer
        self.arrived = 0    # bytes of whole items ever queued
        self.settled = 0    # of those, read or acknowledged early
        self.prepaid = 0    # unread, already acknowledged (the queue's head)
        self.partial = 0    # unacknowledged pieces of the item being received
        self.consumed = 0   # read, not yet acknowledged
        self.eager = 0      # waiters that want data acknowledged on arrival
        self.parts = []     # pieces of the item being received (receiver thread)
        self.parts_size = 0

    # -- sending --

    def fits(self, size):
        return not self.unacked or self.unacked + size <= self.window

    def got_ack(self, size):
        with self.lock:
            self.unacked = max(0, self.unacked - size)
            self.cond.notify_all()

    # -- receiving --

    def _caught_up(self):
        return not self.prepaid and self.arrived == self.settled

    def piece_arrived(self, size):
        with self.lock:
            if not (self.eager or self._caught_up()):
                self.partial += size
                return 0
            # acknowledged as if read, in batches (a large item's pieces
            # would otherwise cost an acknowledgement each)
            self.consumed += size
            if self.consumed < self.threshold:
                return 0
            size, self.consumed = self.consumed, 0
            return size

    def item_arrived(self, size):
        """Returns (bytes to acknowledge now, the item's size for item_read)."""
        if _NO_GIL:  # see the top of section 5
            with self.lock:
                size += self.partial
                self.partial = 0
                self.arrived += size
                eager = self.eager
            return (eager and self.pay_all()), size
        if self.partial:
            with self.lock:
                size += self.partial
                self.partial = 0
        self.arrived += size
        return (self.eager and self.pay_all()), size

    def pay_all(self):
        """Acknowledge every unread byte now (they become prepaid)."""
        with self.lock:
            unpaid = self.arrived - self.settled
            self.settled += unpaid
            self.prepaid += unpaid
            return unpaid

    def item_read(self, size):
        with self.lock:
            paid = min(self.prepaid, size)
            self.prepaid -= paid
            self.settled += size - paid
            self.consumed += size - paid
            if self.partial and self._caught_up():
                # the reader caught up: the large item in progress may flow on
                self.consumed += self.partial
                self.partial = 0
            elif self.consumed < self.threshold:
                return 0
            size, self.consumed = self.consumed, 0
            return size

    def begin_eager(self):
        with self.lock:
            self.eager += 1
        size = self.pay_all()
        with self.lock:
            size += self.partial + self.consumed
            self.partial = self.consumed = 0
            return size

    def end_eager(self):
        with self.lock:
            self.eager -= 1

    def drop_parts(self):
        """Forget the item being received; returns its unacknowledged bytes."""
        self.parts = []
        self.parts_size = 0
        with self.lock:
            size, self.partial = self.partial, 0
            return size


class Channel:
    """One end of a two-way message pipe between two interpreters."""

    RemoteError = RemoteError
    TimeoutError = TimeoutError
    _executing = False
    _peer_closed = False   # the peer closed (or vanished): it receives no more
    _unread_errors_ok = False   # set for a via= stream's channels nobody reads any more

    def __init__(self, gateway, id):
        """:private: made by Gateway.newchannel() and remote_exec()."""
        self.gateway = gateway
        self.id = id
        self._items = _Queue()         # None once a callback is set
        self._closed = False           # we will send no more
        self._receiveclosed = threading.Event()  # the peer will send no more
        self._remoteerrors = []
        self._flow = _Flow(gateway._window, gateway._ack_threshold)
        self._sendlock = threading.Lock()

    def __repr__(self):
        return "<Channel id=%d %s>" % (self.id, "closed" if self.isclosed() else "open")

    def __del__(self):
        gateway = self.gateway
        if gateway is None:
            return
        try:
            if self._closed and not self._unread_errors_ok:
                for error in self._remoteerrors:
                    error.warn()
            elif not self._receiveclosed.is_set():
                # nobody can receive from this channel any more
                code = _MSG_LAST_MESSAGE if self._items is None else _MSG_CLOSE
                gateway._queue_frame(_encode_frame(code, self.id))
        except Exception:
            pass  # interpreter shutdown or dead gateway: nothing to tell

    # -- public API --

    def isclosed(self):
        """True if the channel is closed (it may still hold items)."""
        return self._closed

    def send(self, item):
        """Send item to the other side; blocks while the peer's window is full."""
        if self._closed:
            raise OSError(_Text.SEND_CLOSED % (self,))
        gateway = self.gateway
        raw = (type(item) is bytes and _READ_SIZE < len(item) <= gateway._max_item - 7
               and len(item) < 0x7FFFFFF0)   # (the length field is 4 bytes, signed)
        if raw:
            data = item   # sent from the caller's object (see _send_data)
        else:
            data = dumps(item)
            if len(data) > gateway._max_item:
                raise DumpError(_Text.ITEM_TOO_LARGE_TO_SEND % (
                    len(data), gateway.id, gateway._max_item))
        # one item at a time per channel: its pieces must not interleave
        lock = self._sendlock
        if not lock.acquire(False):
            if threading.get_ident() == gateway._receiver_ident:
                # a callback must not wait for a sender that may wait for it
                _daemon(self._send_in_thread, (data, raw), "execnet_single-send-%d" % self.id)
                return
            lock.acquire()
        try:
            self._send_data(data, raw)
        finally:
            lock.release()

    def receive(self, timeout=None):
        """Return the next item; raise TimeoutError, EOFError or RemoteError."""
        items = self._items
        if items is None:
            raise OSError(_Text.HAS_CALLBACK)
        try:
            entry = items.get(timeout=timeout)
        except _Empty:
            raise self.TimeoutError("no item after %r seconds" % (timeout,)) from None
        if entry is _ENDMARKER:
            items.put(entry)  # for other receivers
            raise self._pop_error() or EOFError(self._eof_text())
        item, size = entry
        size = self._flow.item_read(size)
        if size:
            self.gateway._send_ack(self.id, size)
        return item

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self.receive()
        except EOFError:
            raise StopIteration from None

    next = __next__

    def waitclose(self, timeout=None):
        """Wait until the peer sends no more; re-raise its error if any.

        While waiting, data arriving on this channel is acknowledged at once
        (it will be read later), so a peer sending more than the window
        before closing does not wait for us forever.
        """
        self._begin_eager()
        try:
            if not self._receiveclosed.wait(timeout):
                raise self.TimeoutError("Timeout after %r seconds" % (timeout,))
        finally:
            self._flow.end_eager()
        error = self._pop_error()
        if error:
            raise error

    def close(self, error=None):
        """Close the channel (with an optional error text for the peer)."""
        if self._executing:
            raise OSError(_Text.CLOSE_IN_EXEC)
        if self._closed:
            return
        if not self._peer_closed:
            if error is not None:
                text = str(error)
                if type(error) is _ErrorText and error.kind:
                    text = (text, error.kind)  # the peer raises it typed
                self.gateway._send(_MSG_CLOSE_ERROR, self.id, dumps(text))
            else:
                self.gateway._send(_MSG_CLOSE, self.id)
        if isinstance(error, RemoteError):
            self._remoteerrors.append(error)
        self._mark_closed(sendonly=False)

    def setcallback(self, callback, endmarker=_NO_ENDMARKER_WANTED):
        """Call callback(item) in the receiver thread for every item.

        Already queued items are delivered first; if endmarker is given,
        callback(endmarker) is called once when the channel closes.
        """
        gateway = self.gateway
        with gateway._receivelock:
            items = self._items
            if items is None:
                raise OSError("%r has a callback already" % (self,))
            self._items = None
            while True:
                try:
                    entry = items.get(block=False)
                except _Empty:
                    if not (self._closed or self._receiveclosed.is_set()):
                        gateway._set_callback(self.id, callback, endmarker, self._flow)
                    break
                if entry is _ENDMARKER:
                    items.put(entry)
                    if endmarker is not _NO_ENDMARKER_WANTED:
                        callback(endmarker)
                    break
                callback(entry[0])
                self._ack(self._flow.item_read(entry[1]))

    def makefile(self, mode="w", proxyclose=False):
        """A file-like object writing to ("w") or reading from ("r") the channel."""
        if mode == "w":
            return _ChannelFileWrite(self, proxyclose)
        if mode == "r":
            return _ChannelFileRead(self, proxyclose)
        raise ValueError("mode %r not available" % (mode,))

    def reconfigure(self, py2str_as_py3str=True, py3str_as_py2str=False):
        """Accepted for execnet compatibility; both ends are Python 3."""
        self._strconfig = (py2str_as_py3str, py3str_as_py2str)

    def _eof_text(self):
        """Why receive() finds the channel at its end."""
        gateway = self.gateway
        if gateway._finished:
            return _Text.CHANNEL_GATEWAY_ENDED % (self.id, gateway.id)
        if self._peer_closed:
            return _Text.CHANNEL_PEER_CLOSED % (self.id, gateway.id)
        return _Text.CHANNEL_CLOSED % (self.id, gateway.id)

    def _pop_error(self):
        """The error receive() and waitclose() raise, if any."""
        try:
            return self._remoteerrors.pop(0)
        except IndexError:
            return self.gateway._error

    def _getremoteerror(self):
        # execnet's name, called by pytest-xdist: the remote's own error, or
        # why the remote died (a GatewayDied, not the EOFError receive raises)
        try:
            return self._remoteerrors.pop(0)
        except IndexError:
            return self.gateway._death or self.gateway._error

    # -- sending and flow control --

    def _send_in_thread(self, data, raw):
        try:
            with self._sendlock:
                self._send_data(data, raw)
        except OSError as exc:
            _log(30, "gateway %s: a callback's send on channel %d failed: %s" % (
                self.gateway.id, self.id, exc))

    def _send_data(self, data, raw=False):
        """Send a serialized item, or (raw) a large bytes item itself: then
        its serialized head and stop byte travel as pieces of their own, so
        the item's bytes go out without a copy."""
        gateway = self.gateway
        chunk = gateway._chunk
        if len(data) <= chunk and not raw:
            self._take_credit(len(data))
            gateway._send(_MSG_DATA, self.id, data)
            return
        view = memoryview(data)
        pieces = [view[start:start + chunk] for start in range(0, len(data), chunk)]
        if raw:
            pieces = [_BYTES_HEAD + _pack_i4(len(data))] + pieces + [_STOP_BYTE]
        last = len(pieces) - 1
        for index, piece in enumerate(pieces):
            self._take_credit(len(piece))
            gateway._send(_MSG_DATA if index == last else _MSG_DATA_PART, self.id, piece)
            gateway._yield_writer()

    def _take_credit(self, size):
        flow = self._flow
        gateway = self.gateway
        with flow.lock:
            unacked = flow.unacked
            if (not unacked or unacked + size <= flow.window
                    or threading.get_ident() == gateway._receiver_ident):
                flow.unacked = unacked + size  # (the receiver thread never waits)
                return
        # While we wait for the peer, what it sends here is acknowledged on
        # arrival: it may be waiting for credit from us just the same.
        self._begin_eager()
        try:
            with flow.cond:
                while not flow.fits(size):
                    if self._closed or gateway._finished:
                        raise OSError(_Text.SEND_CLOSED % (self,))
                    flow.cond.wait()
                flow.unacked += size
        finally:
            flow.end_eager()

    def _deliver(self, item, size):
        """Queue an arrived item of size bytes for receive() (receiver
        thread, under the gateway's receive lock); False if a callback
        took over the queue."""
        items = self._items
        if items is None:
            return False
        flow = self._flow
        if flow.partial:
            ack, size = flow.item_arrived(size)
        else:  # item_arrived inlined (a hot path): add first, then look
            flow.arrived += size
            ack = flow.eager and flow.pay_all()
        if ack:
            self.gateway._send_ack(self.id, ack)
        items.put((item, size))
        return True

    def _got_ack(self, size):
        self._flow.got_ack(size)

    def _close_sending(self):
        """We send no more, but still receive (LAST_MESSAGE to the peer)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.gateway._send(_MSG_LAST_MESSAGE, self.id)
        except OSError:
            pass
        with self._flow.cond:
            self._flow.cond.notify_all()  # a sender waiting for credit gives up

    def _begin_eager(self):
        self._ack(self._flow.begin_eager())

    def _ack(self, size):
        if size:
            self.gateway._send_ack(self.id, size)

    def _mark_closed(self, sendonly, error=None, peer=False):
        """State change on close; wakes receivers, senders and callbacks.

        sendonly: only the peer's sending ended; peer: the peer closed.
        """
        if peer:
            self._peer_closed = True
        if error is not None:
            self._remoteerrors.append(error)
        if not sendonly:
            self._closed = True
        self._receiveclosed.set()
        items = self._items
        if items is not None:
            items.put(_ENDMARKER)
        with self._flow.cond:
            self._flow.cond.notify_all()
        # after the peer's LAST_MESSAGE we may still send: keep routing its acks
        self.gateway._no_longer_opened(self.id, forget=self._closed)


_SAVERS[Channel] = _save_channel


class _ChannelFile:
    def __init__(self, channel, proxyclose):
        self.channel = channel
        self._proxyclose = proxyclose

    def isatty(self):
        return False

    def close(self):
        if self._proxyclose:
            self.channel.close()

    def __repr__(self):
        state = "closed" if self.channel.isclosed() else "open"
        return "<ChannelFile %d %s>" % (self.channel.id, state)


class _ChannelFileWrite(_ChannelFile):
    def write(self, out):
        self.channel.send(out)

    def flush(self):
        pass


class _ChannelFileRead(_ChannelFile):
    def __init__(self, channel, proxyclose):
        _ChannelFile.__init__(self, channel, proxyclose)
        self._buffer = None

    def _fill(self, enough):
        try:
            if self._buffer is None:
                self._buffer = self.channel.receive()
            while not enough(self._buffer):
                self._buffer += self.channel.receive()
        except EOFError:
            self.close()

    def read(self, n):
        self._fill(lambda buf: len(buf) >= n)
        if self._buffer is None:
            return ""
        result, self._buffer = self._buffer[:n], self._buffer[n:]
        return result

    def readline(self):
        self._fill(lambda buf: "\n" in buf if isinstance(buf, str) else b"\n" in buf)
        if self._buffer is None:
            return ""
        newline = "\n" if isinstance(self._buffer, str) else b"\n"
        i = self._buffer.find(newline)
        if i < 0:
            result, self._buffer = self._buffer, self._buffer[:0]
        else:
            result, self._buffer = self._buffer[:i + 1], self._buffer[i + 1:]
        return result


# === 6. Gateway core ===


class _GatewayBase:
    """What both ends share: the frame writer, the receiver thread, channels.

    Writing: a thread that sends takes the write lock and writes its frame.
    The receiver thread never does: whatever it sends (acknowledgements,
    replies, a callback's items) is queued, as are frames from finalizers,
    and written by the next thread that holds the lock or by the flusher
    thread.  So the receiver always keeps reading, whatever the peer does,
    and the peer's writers always make progress.
    """

    _error = None
    _death = None   # a GatewayDied once the remote ended unasked (local side)
    _receiver = None
    _receiver_ident = None
    _close_requested = False   # the flusher closes the write side when idle
    _exit_requested = False    # we asked the peer to go

    def __init__(self, io, id, startcount, execmodel, window, max_item=_MAX_ITEM):
        import weakref
        from _collections import deque

        self._io = io
        _watch_forks()
        self._pid = os.getpid()
        self.id = id
        self.execmodel = get_execmodel(execmodel)
        self._window = window
        self._max_item = max_item
        self._chunk = max(1, min(_CHUNK, window // 4))
        self._ack_threshold = max(1, window // 4)
        self._wlock = threading.Lock()
        self._write_waiters = 0
        self._waitlock = threading.Lock()
        self._outq = deque()            # frames queued for the writer
        self._wakeup = threading.Lock()  # released to wake the flusher
        self._wakeup.acquire()
        self._flusher = None
        self._receivelock = threading.RLock()
        self._channels = weakref.WeakValueDictionary()
        self._callbacks = {}
        self._chanlock = threading.Lock()
        self._count = startcount
        self._finished = False
        self._handlers = {
            _MSG_STATUS: self._on_status,
            _MSG_RECONFIGURE: self._on_ignore,
            _MSG_TERMINATE: self._on_terminate,
            _MSG_EXEC: self._on_exec,
            _MSG_DATA: self._on_data,
            _MSG_CLOSE: self._on_close,
            _MSG_CLOSE_ERROR: self._on_close_error,
            _MSG_LAST_MESSAGE: self._on_last_message,
            _MSG_DATA_PART: self._on_data_part,
            _MSG_ACK: self._on_ack,
            _MSG_OUTPUT: self._on_output,
            _MSG_READY: self._on_ignore,
            _MSG_STACKS: self._on_stacks,
        }

    def __repr__(self):
        return "<%s id=%r %s, %s model, %d active channels>" % (
            self.__class__.__name__, self.id,
            "receive-live" if self.hasreceiver() else "not-receiving",
            self.execmodel.backend, len(self._channels))

    # -- writing --

    def _send(self, msgcode, channelid=0, payload=b""):
        if (_PID[0] or os.getpid()) != self._pid:
            # a fork (multiprocessing, say) must not write into our stream,
            # nor wait for a lock some vanished thread held at the fork
            raise OSError("gateway %s: %s" % (self.id, _Text.FORKED))
        header = _HEADER.pack(msgcode, channelid, len(payload))
        if threading.get_ident() == self._receiver_ident:
            self._queue_frame(header + bytes(payload))
            return
        lock = self._wlock
        if not lock.acquire(False):
            self._acquire_writer()
        try:
            if self._outq:
                self._write_queued()
            if len(payload) < _READ_SIZE:
                self._io.write(header + payload)
            else:
                self._io.widen()
                self._io.writev((header, payload))
        except (OSError, ValueError) as exc:
            raise OSError("gateway %s: cannot send (%s)" % (self.id, exc)) from None
        finally:
            lock.release()

    def _acquire_writer(self):
        lock = self._wlock
        if not lock.acquire(False):
            # contended: count ourselves so a large send lets us in between pieces
            with self._waitlock:
                self._write_waiters += 1
            lock.acquire()
            with self._waitlock:
                self._write_waiters -= 1

    def _queue_frame(self, frame):
        """Queue a frame for the writer; never blocks (receiver, finalizers)."""
        if (_PID[0] or os.getpid()) != self._pid:
            return  # a fork: nothing of ours may reach the parent's stream
        self._outq.append(frame)
        self._kick()

    def _kick(self):
        try:
            self._wakeup.release()
        except RuntimeError:
            pass  # already awake

    def _write_queued(self):
        """Write queued frames (write lock held)."""
        queue = self._outq
        while queue:
            frame = queue.popleft()
            if (_PID[0] or os.getpid()) != self._pid:
                return
            self._io.write(frame)

    def _send_ack(self, cid, size):
        """Acknowledge size bytes on channel cid; queued, so nobody waits."""
        while size > 0:
            part = min(size, 0xFFFFFFFF)
            self._queue_frame(_encode_frame(_MSG_ACK, cid, _COUNT.pack(part)))
            size -= part

    def _flush_loop(self):
        """The flusher thread: write queued frames whenever there are some."""
        while True:
            self._wakeup.acquire()
            self._acquire_writer()
            try:
                self._write_queued()
            except (OSError, ValueError):
                self._outq.clear()  # the peer is gone: nobody to tell
            finally:
                close = self._close_requested and not self._outq
                if close:
                    self._io.close_write()
                self._wlock.release()
            if close or (self._finished and not self._outq):
                return

    def _yield_writer(self):
        """Between pieces of a large item: let a waiting sender go first."""
        if self._write_waiters > 0:
            import time

            time.sleep(0.0005)

    def _send_frame(self, msgcode, channelid, payload):
        """Send a raw frame (for tests that inject malformed data)."""
        self._send(msgcode, channelid, payload)

    # -- channels --

    def newchannel(self):
        """Return a new channel, not yet tied to any remote code."""
        return self._new_channel(None)

    def _new_channel(self, id):
        with self._chanlock:
            if self._finished:
                raise OSError("gateway %s: connection already closed" % (self.id,))
            if id is None:
                id = self._count
                self._count += 2
            channel = self._channels.get(id)
            if channel is None:
                channel = self._channels[id] = Channel(self, id)
            return channel

    def _no_longer_opened(self, id, forget=True):
        """The peer sends no more on channel id (forget: nor do we)."""
        if forget:
            self._channels.pop(id, None)
        entry = self._callbacks.pop(id, None)
        if entry is not None and entry[1] is not _NO_ENDMARKER_WANTED:
            entry[0](entry[1])

    def _local_close(self, id, error=None, sendonly=False):
        channel = self._channels.get(id)
        if channel is None:
            if error is not None:
                error.warn()
            self._no_longer_opened(id)
        else:
            channel._mark_closed(sendonly, error, peer=not sendonly)

    def _set_callback(self, id, callback, endmarker, flow):
        """Deliver channel id's items to callback from now on (setcallback)."""
        self._callbacks[id] = (callback, endmarker, flow)

    def _channel_failed(self, cid, text):
        """Close one channel with an error (both ends); the others carry on."""
        _log(40, text)
        try:
            self._send(_MSG_CLOSE_ERROR, cid, dumps(text))
        except OSError:
            pass
        self._local_close(cid, LoadError(text))

    # -- receiving --

    def _start_receiver(self, initial=b""):
        self._flusher = _daemon(self._flush_loop, (), "execnet_single-writer-%s" % (self.id,))
        self._receiver = _daemon(self._receive_loop, (initial,),
                                 "execnet_single-receiver-%s" % (self.id,))

    def hasreceiver(self):
        """True while the receiver thread runs."""
        return self._receiver is not None and self._receiver.is_alive()

    def _receive_loop(self, initial):
        self._receiver_ident = threading.get_ident()
        read = self._io.read
        feed = _FrameReader().feed
        handlers = self._handlers
        error = None
        try:
            data = initial or read()
            while data:
                for code, cid, payload in feed(data):
                    handlers[code](cid, payload)
                data = read()
            _trace(self.id, "receiver: end of stream")
        except _GatewayTerminated:
            _trace(self.id, "receiver: terminate requested")
        except LoadError as exc:
            error = exc
            _log(40, "gateway %s: protocol error, closing: %s" % (self.id, exc))
        except _StreamError as exc:
            error = exc
            _log(20 if self._exit_requested else 30, "gateway %s: %s" % (self.id, exc))
        except Exception as exc:  # a bug or a dying interpreter
            error = exc
            _log(40, "gateway %s: receiver failed: %r" % (self.id, exc))
        finally:
            self._finished_receiving(error)

    def _finished_receiving(self, error=None):
        with self._chanlock:
            self._finished = True
        if self._error is None:
            self._error = self._connection_error(error)
        for channel in list(self._channels.values()):
            channel._mark_closed(sendonly=True, peer=True)
        for id in list(self._callbacks):
            self._no_longer_opened(id)
        self._kick()  # the flusher may end

    def _connection_error(self, error):
        """The error receivers see once the stream ended (None: plain EOF)."""
        if error is None:
            return None
        return EOFError(_Text.CONNECTION_LOST % (self.id, ": %s" % (error,)))

    # -- handlers, run in the receiver thread --

    def _on_ignore(self, cid, payload):
        pass

    def _on_status(self, cid, payload):
        pass

    def _on_stacks(self, cid, payload):
        pass

    def _on_terminate(self, cid, payload):
        raise _GatewayTerminated()

    def _on_exec(self, cid, payload):
        channel = self._new_channel(cid)
        channel.close("execution disallowed")

    def _receiving(self, cid):
        """(channel or None, its _Flow or None) for data arriving on cid."""
        channel = self._channels.get(cid)
        if channel is not None:  # (closed for sending perhaps, still receiving)
            return channel, channel._flow
        entry = self._callbacks.get(cid)  # a callback outlives its channel object
        return None, (entry[2] if entry is not None else None)

    def _too_large(self, cid, flow, size):
        """An item grew past max_item: drop it and close its channel."""
        self._send_ack(cid, flow.drop_parts() + size)
        self._channel_failed(cid, _Text.ITEM_TOO_LARGE % (self.id, cid, self._max_item))

    def _on_data_part(self, cid, payload):
        channel, flow = self._receiving(cid)
        size = len(payload)
        if flow is None:
            self._send_ack(cid, size)  # nobody will read it
        elif flow.parts_size + size > self._max_item:
            self._too_large(cid, flow, size)
        else:
            if type(payload) is _Pieces:
                flow.parts.extend(payload)
            else:
                flow.parts.append(payload)
            flow.parts_size += size
            self._send_ack(cid, flow.piece_arrived(size))

    def _on_data(self, cid, payload):
        channel = self._channels.get(cid)  # (_receiving, inlined: hot path)
        if channel is not None:
            flow = channel._flow
        else:
            flow = self._receiving(cid)[1]
        size = len(payload)
        if flow is None:
            self._send_ack(cid, size)  # nobody will ever read it
            return
        if flow.parts:
            if flow.parts_size + size > self._max_item:
                self._too_large(cid, flow, size)
                return
            if type(payload) is _Pieces:
                flow.parts.extend(payload)
            else:
                flow.parts.append(payload)
            payload = _join_pieces(flow.parts)
            flow.parts = []
            flow.parts_size = 0
        elif type(payload) is _Pieces:
            payload = _join_pieces(payload)
        try:
            if type(payload) is _BigBytes:
                item = payload.value
            else:
                item = _loads(payload, self._channel_for_load)
        except LoadError as exc:
            self._send_ack(cid, flow.drop_parts() + size)
            self._channel_failed(cid, _Text.CHANNEL_LOAD_FAILED % (self.id, cid, exc))
            return
        with self._receivelock:
            entry = self._callbacks.get(cid)
            if entry is None:
                if channel is not None and channel._deliver(item, size):
                    return
                entry = (_drop_item, None)  # the callback was set and is gone again
            ack, size = flow.item_arrived(size)
            if ack:
                self._send_ack(cid, ack)
            try:
                entry[0](item)
            except Exception as exc:
                _log(40, "gateway %s: exception in channel %d callback: %r" % (self.id, cid, exc))
                text = _format_error(exc)
                try:
                    self._send(_MSG_CLOSE_ERROR, cid, dumps(text))
                except OSError:
                    pass
                self._local_close(cid, RemoteError(text))
                return
        ack = flow.item_read(size)
        if ack:
            self._send_ack(cid, ack)

    def _channel_for_load(self, id):
        return self._new_channel(id)

    def _on_close(self, cid, payload):
        self._local_close(cid)

    def _on_close_error(self, cid, payload):
        try:
            text = _loads(payload)
        except LoadError as exc:
            text = "(unreadable error text: %s)" % (exc,)
        if type(text) is tuple and len(text) == 2:  # (text, kind): see _ErrorText
            error = _remote_error(str(text[0]), text[1])
        else:
            error = RemoteError(str(text))
        self._local_close(cid, error)

    def _on_last_message(self, cid, payload):
        self._local_close(cid, sendonly=True)

    def _on_ack(self, cid, payload):
        channel = self._channels.get(cid)
        if channel is not None and len(payload) == 4:
            channel._got_ack(_COUNT.unpack(payload)[0])

    def _on_output(self, cid, payload):
        pass


def _drop_item(item):
    """The callback of a channel whose callback has gone: nobody reads."""


class _BigBytes:
    """A large bytes item joined straight from its pieces (no extra copy)."""

    def __init__(self, value):
        self.value = value


def _join_pieces(pieces):
    """The serialized item from its pieces (bytes or views), or _BigBytes
    for a plain bytes item (joined without its serialized head and tail:
    the item's only copy)."""
    first, last = pieces[0], pieces[-1]
    if (len(first) >= 6 and first[:2] == _BYTES_HEAD and last[-1:] == _STOP_BYTE
            and _unpack_i4(first, 2)[0] == sum(map(len, pieces)) - 7):
        views = [memoryview(piece) for piece in pieces]
        views[0] = views[0][6:]
        views[-1] = views[-1][:-1]   # (the same view, if there is one piece)
        return _BigBytes(b"".join(views))
    return b"".join(pieces)


class _GatewayTerminated(Exception):
    """Internal: the receiver got _MSG_TERMINATE."""


class _StreamError(Exception):
    """Internal: a transport's read failed for a reason it can tell."""


_STACKS_LIMIT = 64 * 1024   # characters of stack text sent or shown at most


def _format_stacks(limit=_STACKS_LIMIT):
    """Every other thread's stack in this process, main thread first, at most limit chars."""
    import traceback

    names = dict((t.ident, t.name) for t in threading.enumerate())
    main = threading.main_thread().ident
    me = threading.get_ident()  # the thread formatting: its stack tells nothing
    frames = sorted((item for item in sys._current_frames().items() if item[0] != me),
                    key=lambda item: item[0] != main)
    text = "".join("Thread %s (%s):\n%s" % (names.get(ident, "?"), ident,
                                          "".join(traceback.format_stack(frame)))
                   for ident, frame in frames)
    if len(text) > limit:
        text = text[:limit] + "\n" + _Text.STACKS_CUT % limit
    return text


def _format_error(exc):
    """The traceback text of exc, as sent to the other side."""
    import traceback

    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        return "%s: %s" % (type(exc).__name__, exc)


# === 7. Remote side ===
#
# The bootstrap (section 8) execs this file as module `execnet_single` in the
# new interpreter and calls _remote_main().  The protocol keeps private
# duplicates of fds 0 and 1; fd 0 becomes /dev/null and fds 1 and 2 become
# pipes whose bytes travel to the local side as _MSG_OUTPUT frames, so
# print() or os.write(1, ...) can never corrupt the protocol.

_EXIT_GRACE = 1.0   # remote: how long running code may finish after terminate
_GRACE = struct.Struct("!d")   # a _MSG_TERMINATE payload: a longer grace (Group.terminate)


class _RemoteGateway(_GatewayBase):
    _exit_grace = _EXIT_GRACE
    """The remote end: runs remote_exec requests, forwards output."""

    def __init__(self, io, params):
        _GatewayBase.__init__(self, io, params["id"], 2, params["execmodel"],
                              params["window"], params.get("max_item") or _MAX_ITEM)
        self._tasks = _Queue()
        self._active = 0
        self._idle = threading.Condition(threading.Lock())
        self._forwarder = None
        self._relayed = []   # processes started here for via= gateways

    def _on_stacks(self, cid, payload):
        # answered in the receiver thread: works while the main thread is busy
        self._send(_MSG_DATA, cid, dumps(_format_stacks()))
        self._send(_MSG_CLOSE, cid)

    def _on_terminate(self, cid, payload):
        if len(payload) == _GRACE.size:   # the local side waits longer than exit()
            grace = _GRACE.unpack(payload)[0]
            if _EXIT_GRACE < grace < 3600.0:
                self._exit_grace = grace
        if self._active:  # busy: the local side shows these if it must kill us
            self._send(_MSG_STACKS, 0, dumps(_format_stacks()))
        raise _GatewayTerminated()

    def _on_status(self, cid, payload):
        status = {
            "numchannels": len(self._channels),
            "numexecuting": self._active,
            "execmodel": self.execmodel.backend,
        }
        self._send(_MSG_DATA, cid, dumps(status))
        self._send(_MSG_CLOSE, cid)

    def _on_exec(self, cid, payload):
        channel = self._new_channel(cid)
        try:
            task = _loads(payload)
        except LoadError as exc:
            self._channel_failed(cid, _Text.CHANNEL_LOAD_FAILED % (self.id, cid, exc))
            return
        if self.execmodel.backend != "main_thread_only":
            with self._idle:
                self._active += 1
            self._start_thread(self._execute, channel, task)
            return
        with self._idle:
            if not self._active:
                self._active += 1
                self._tasks.put((channel, task))
                return
        # the previous task may be just finishing: look again for a moment,
        # in a thread of its own (the receiver thread never waits)
        self._start_thread(self._queue_when_idle, channel, task)

    def _queue_when_idle(self, channel, task):
        with self._idle:
            if self._idle.wait_for(lambda: not self._active, 1.0):
                self._active += 1
                self._tasks.put((channel, task))
                return
        try:
            channel.close(_Text.MAIN_THREAD_BUSY)
        except OSError:
            pass

    def _start_thread(self, target, channel, task):
        _daemon(target, (channel, task), "execnet_single-exec-%d" % channel.id)

    def _execute(self, channel, task):
        """Run one remote_exec task; close its channel with the outcome."""
        source = filename = None
        error = None
        try:
            source, filename, call_name, kwargs = task
            namespace = {"channel": channel, "__name__": "__channelexec__"}
            _trace(self.id, "exec on channel", channel.id, repr(source)[:50])
            channel._executing = True
            try:
                code = compile(source + "\n", filename or "<remote exec>", "exec")
                exec(code, namespace)
                if call_name:
                    namespace[call_name](channel, **kwargs)
            finally:
                channel._executing = False
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too
            if not (isinstance(exc, EOFError) and self._finished):
                _remember_source(filename or "<remote exec>", source)
                error = _ErrorText(_format_error(exc))
                error.kind = _error_kind(exc)
        finally:
            _flush_std_streams()
            # idle before the close goes out: the next remote_exec may follow it
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
            try:
                channel.close(error)
            except OSError:
                pass

    def _serve(self):
        """The remote main thread: run main_thread_only tasks until exit."""
        while True:
            entry = self._tasks.get()
            if entry is None:
                return
            self._execute(*entry)

    def _finished_receiving(self, error=None):
        _GatewayBase._finished_receiving(self, error)
        # Give running code a grace period, then leave, busy or not: the
        # local side asked us to go (or is gone).
        self._tasks.put(None)
        with self._idle:
            idle = self._idle.wait_for(lambda: not self._active, self._exit_grace)
        if not idle:  # leave a trace of where it hangs, as output on fd 2 (the
            # fd itself may be captured, e.g. by pytest in an xdist worker)
            text = "%s\n%s" % (_Text.STACKS_ABANDONED % self._exit_grace, _format_stacks())
            self._send(_MSG_OUTPUT, 2, text.encode("utf-8", "backslashreplace"))
        # a sealed stream that failed its check: the server logs why
        self._exit_process(_SEAL_STATUS if isinstance(error, _StreamError) else 0)

    def _exit_process(self, status=0):
        _flush_std_streams()
        if self._forwarder is not None:
            self._forwarder.finish()
        for io in self._relayed:
            io.kill()  # a via gateway's process must not outlive its proxy
        if self._wlock.acquire(timeout=_EXIT_GRACE):
            try:
                self._write_queued()
            except (OSError, ValueError):
                pass
        self._io.close_write()
        if self._io.__class__ is _SealedIO:
            self._io.drain(_EXIT_GRACE)
        os._exit(status)


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _remember_source(filename, source):
    """Let tracebacks show remote_exec'd source lines."""
    if source is None:
        return
    import linecache

    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


class _SentSourceLoader:
    """This module's loader on the remote side, where it has no file: its
    source for linecache, inspect and tracebacks, and the __spec__.loader
    that 3.15's warnings machinery looks for (without one, a warning raised
    in a frame of this module added "Module globals is missing a
    __spec__.loader" to the remote's output)."""

    def get_source(self, name):
        source = _SOURCE
        return source.decode("utf-8") if isinstance(source, bytes) else source


def _set_own_spec():
    """Give this module, made by the bootstrap, a spec and a loader."""
    # importlib.machinery's ModuleSpec is the import system's own class:
    # taken from there, without importing importlib (about 0.5 ms a start)
    spec_class = getattr(sys.modules.get("_frozen_importlib"), "ModuleSpec", None)
    if spec_class is None:
        import importlib.machinery

        spec_class = importlib.machinery.ModuleSpec
    loader = _SentSourceLoader()
    module = globals()
    module["__loader__"] = loader
    module["__spec__"] = spec_class(
        __name__, loader, origin="<execnet_single source sent by the local side>")


class _OutputForwarder:
    """Makes fds 1 and 2 pipes and sends what arrives as _MSG_OUTPUT frames.

    Text written to sys.stdout/sys.stderr goes through write(), which first
    sends what the pipe already holds: so os.write(1, ...) and print() keep
    their order, and printed text stays in order with channel data.
    """

    def __init__(self, gateway):
        self._gateway = gateway
        self._pid = os.getpid()
        self._pipes = {}
        self._locks = {}
        for target in (1, 2):
            rfd, wfd = os.pipe()
            if not _WINDOWS:  # (Windows: _drain reads only what _pipe_available says)
                os.set_blocking(rfd, False)
            os.dup2(wfd, target)
            os.close(wfd)
            _binary_fds(rfd, target)
            self._pipes[target] = rfd
            self._locks[target] = threading.Lock()
        self._thread = _daemon(self._poll if _WINDOWS else self._run, (),
                               "execnet_single-output")

    def _poll(self, interval=0.05):
        """Windows has no select on pipes: look into them every interval."""
        import time

        pipes = dict(self._pipes)
        while pipes:
            for target in list(pipes):
                with self._locks[target]:
                    if not self._drain(target):
                        del pipes[target]
            time.sleep(interval)

    def _run(self):
        import select

        pipes = dict(self._pipes)
        while pipes:
            try:
                ready = select.select(list(pipes.values()), [], [])[0]
            except (OSError, ValueError):
                return
            for target, rfd in list(pipes.items()):
                if rfd in ready:
                    with self._locks[target]:
                        if not self._drain(target):
                            del pipes[target]

    def _drain(self, target):
        """Send what the pipe holds now (lock held); False at its end."""
        while True:
            size = _READ_SIZE
            if _WINDOWS:
                size = _pipe_available(self._pipes[target])
                if size is None:
                    return False
                if not size:
                    return True
            try:
                data = os.read(self._pipes[target], min(size, _READ_SIZE))
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self._send(target, data)

    def _send(self, target, data):
        try:
            self._gateway._send(_MSG_OUTPUT, target, data)
        except OSError:
            pass  # the local side is gone: nobody to show it to

    def write(self, target, data):
        """Send text-level output, after what the fd already holds."""
        if (_PID[0] or os.getpid()) != self._pid:  # in a fork: the pipe, which we forward
            os.write(target, data)
            return
        with self._locks[target]:
            self._drain(target)
            self._send(target, data)

    def finish(self):
        """Make fds 1 and 2 /dev/null and send everything written before."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        for target in (1, 2):
            with self._locks[target]:
                self._drain(target)


def _output_raw_class():
    """The raw stream class under _make_output_stream (made once)."""
    cls = _output_raw.get("class")
    if cls is None:
        import io

        class OutputRaw(io.RawIOBase):
            def __init__(self, forwarder, fd):
                io.RawIOBase.__init__(self)
                self._forwarder = forwarder
                self._fd = fd

            def writable(self):
                return True

            def fileno(self):
                return self._fd

            def write(self, data):
                self._forwarder.write(self._fd, bytes(data))
                return len(data)

        cls = _output_raw["class"] = OutputRaw
    return cls


_output_raw = {}


def _make_output_stream(forwarder, fd):
    """A text stream for sys.stdout/sys.stderr that sends through forwarder."""
    import io

    return io.TextIOWrapper(io.BufferedWriter(_output_raw_class()(forwarder, fd), 8192),
                            encoding="utf-8", errors="backslashreplace", line_buffering=True)


def _rinfo_dict():
    return {
        "executable": sys.executable,
        "version_info": tuple(sys.version_info[:5]),
        "platform": sys.platform,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
    }


def _remote_main(source, params_bytes, seal=None):
    """Entry point on the remote side, called by the bootstrap.

    seal: (read key, write key, next read sequence number, peer) when the
    stream is a sealed socket session (_STAGE1_SEALED).
    """
    global _SOURCE
    _SOURCE = source
    _set_own_spec()
    params = loads(params_bytes)
    _setup_trace()
    _trace("remote start", params.get("id"))
    os.environ.update(params.get("env") or {})
    chdir = params.get("chdir")
    if chdir:
        if not os.path.exists(chdir):
            os.makedirs(chdir)
        os.chdir(chdir)
    if params.get("nice"):
        _set_niceness(int(params["nice"]))
    if params.get("dont_write_bytecode"):
        sys.dont_write_bytecode = True
    me = sys.modules[__name__]
    for name in params.get("names", ()):
        if name not in sys.modules and name not in _names_checked and not _importable(name):
            sys.modules[name] = me
    for name in params.get("force_names", ()):
        # install_as_execnet() on the local side: shadow an installed execnet
        sys.modules[name] = me
        _alias_state["forced"].add(name)
    rfd = os.dup(0)
    wfd = os.dup(1)
    _binary_fds(rfd, wfd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    io = _FdIO(rfd, wfd)
    if seal is not None:
        io = _SealedIO(io, seal[0], seal[1], seal[3], read_seq=seal[2])
    gateway = _RemoteGateway(io, params)
    if params.get("forward"):
        _install_forward_finder(gateway, params["forward"])
    info = _rinfo_dict()
    spawner = None
    if params.get("spawner_key"):
        # the first ssh gateway of a group to this host: a socket server on
        # the host's loopback for the group's other gateways (see _start_ssh)
        try:
            spawner = _SocketServer("127.0.0.1", 0, params["spawner_key"], log=_trace)
            info["spawner_port"] = spawner.port
        except OSError as exc:
            _trace("no spawner:", exc)
    gateway._send(_MSG_READY, 0, dumps(info))
    if spawner is not None:
        _daemon(spawner.serve_forever, (), "execnet_single-spawner")
    gateway._forwarder = _OutputForwarder(gateway)
    sys.stdout = _make_output_stream(gateway._forwarder, 1)
    sys.stderr = _make_output_stream(gateway._forwarder, 2)
    gateway._start_receiver()
    # The compiler's first use sets up its state (about 1 ms): done here,
    # while the local side reads our READY, not in the first remote_exec.
    compile("pass", "<warm-up>", "exec")
    gateway._serve()
    # main thread done: the receiver thread ends the process
    threading.Event().wait()


_names_checked = set()   # names a fork server found importable: its children skip them


def _importable(name):
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# === 8. Bootstrap ===
#
# 1. Start `python -c _STAGE1`; it evals one line from stdin: repr(_STAGE2).
# 2. _STAGE2 is valid Python 2.7 too.  It answers one line on stdout:
#       execnet_single:too-old <version> <executable>   (and exits), or
#       execnet_single:ok <sys.hexversion> <cache_tag> <abi>
#    where <abi> is implementation:abiflags:gil|nogil (_abi_tag); only a
#    remote equal in all three gets our marshalled code (PyPy, a debug or
#    a free-threaded build of the same version cannot run it).
# 3. Then it reads a 12-byte header (!III: source, code, params lengths),
#    the source of this file, a marshalled code object of it (only if the
#    remote interpreter is exactly ours; else compiled there) and the
#    serialized params; execs the module and calls _remote_main().
# 4. The remote sends _MSG_READY with its rinfo; from then on, frames.
#
# A sealed socket session (section 9) skips steps 1-3: the server starts
# `python -c _STAGE1_SEALED KEYFD PEER`, which reads the session keys from
# the pipe KEYFD (on Windows KEYFD is "-": they come first on stdin), then
# one sealed record (section 4) holding the 12-byte header, source, code and
# params of step 3; it checks the record's tag
# before it looks at any of it, and hands the keys on to _remote_main, so
# the stream stays sealed.  The client knows the interpreter from the
# handshake: no unauthenticated line is read or evaluated by either end.

_STAGE1 = "import sys;exec(eval(sys.stdin.readline()))"
_BOOTSTRAP_TIMEOUT = 60.0   # seconds; the xspec key bootstrap_timeout= overrides
_NOISE_KEEP = 64 * 1024     # bytes of output before the ok line kept for errors
_STAGE2 = r'''
import sys, os
v = sys.version_info
if v < (3, 6):
    os.write(1, ("execnet_single:too-old %d.%d.%d %s\n" % (v[0], v[1], v[2], sys.executable)).encode("ascii", "replace"))
    sys.exit(3)
# the ABI word: implementation:abiflags:gil (see _abi_tag, which must agree)
free = "t" in getattr(sys, "abiflags", "")
if not hasattr(sys, "abiflags") and v >= (3, 13):
    import sysconfig
    free = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
os.write(1, ("execnet_single:ok %d %s %s:%s:%s\n" % (
    sys.hexversion, sys.implementation.cache_tag, sys.implementation.name,
    getattr(sys, "abiflags", ""), "nogil" if free else "gil")).encode("ascii"))
def _readexact(n):
    chunks = []
    while n:
        chunk = os.read(0, n)
        if not chunk:
            sys.exit(4)
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
import struct
slen, clen, plen = struct.unpack("!III", _readexact(12))
source = _readexact(slen)
code = _readexact(clen)
params = _readexact(plen)
if clen:
    import marshal
    code = marshal.loads(code)
else:
    code = compile(source, "execnet_single.py", "exec")
mod = type(sys)("execnet_single")
exec(code, mod.__dict__)
sys.modules["execnet_single"] = mod
mod._remote_main(source, params)
'''
_STAGE2_LINE = (repr(_STAGE2) + "\n").encode("ascii")
_STAGE1_SEALED = r'''
import sys, os, struct, hmac, hashlib
def _readexact(fd, n):
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, min(n - len(data), 1048576))
        if not chunk:
            sys.exit(4)
        data += chunk
    return bytes(data)
if sys.argv[1] == "-":
    keys = _readexact(0, 64)
else:
    fd = int(sys.argv[1])
    keys = _readexact(fd, 64)
    os.close(fd)
head = _readexact(0, 4)
size = struct.unpack("!I", head)[0]
if size > %d:
    sys.exit(%d)
payload = _readexact(0, size)
if size <= %d:
    mac = hashlib.blake2s(key=keys[:32], digest_size=%d)
else:
    mac = hmac.new(keys[:32], digestmod=hashlib.sha256)
mac.update(bytes(8) + head)
mac.update(payload)
if not hmac.compare_digest(mac.digest()[:%d], _readexact(0, %d)):
    sys.exit(%d)
slen, clen, plen = struct.unpack("!III", payload[:12])
source = payload[12:12 + slen]
code = payload[12 + slen:12 + slen + clen]
params = payload[12 + slen + clen:12 + slen + clen + plen]
if clen:
    import marshal
    code = marshal.loads(code)
else:
    code = compile(source, "execnet_single.py", "exec")
mod = type(sys)("execnet_single")
exec(code, mod.__dict__)
sys.modules["execnet_single"] = mod
mod._remote_main(source, params, (keys[:32], keys[32:], 1, sys.argv[2]))
''' % (_BOOT_RECORD_MAX, _SEAL_STATUS, _SMALL_RECORD, _TAG_SIZE, _TAG_SIZE, _TAG_SIZE,
       _SEAL_STATUS)
_code_cache = {}


def _get_source():
    """This file's source bytes (read once, when the first gateway starts)."""
    global _SOURCE
    if _SOURCE is None:
        with open(__file__, "rb") as f:
            _SOURCE = f.read()
    return _SOURCE


def _abi_tag():
    """implementation:abiflags:gil|nogil of this interpreter, as _STAGE2 prints it."""
    free = "t" in getattr(sys, "abiflags", "")  # POSIX: a free-threaded build's flags
    if not hasattr(sys, "abiflags") and sys.version_info >= (3, 13):
        import sysconfig

        free = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    return "%s:%s:%s" % (sys.implementation.name, getattr(sys, "abiflags", ""),
                         "nogil" if free else "gil")


def _code_for_remote(hexversion, cache_tag, abi=None):
    """Marshalled code of this file if the remote interpreter is exactly ours.

    abi is the remote's _abi_tag(); None (not known) sends no code.
    """
    if (hexversion != sys.hexversion or cache_tag != sys.implementation.cache_tag
            or abi != _abi_tag()):
        return b""
    if "code" not in _code_cache:
        code = _code_from_pyc()
        if code is None:
            import marshal

            code = marshal.dumps(compile(_get_source(), "execnet_single.py", "exec"))
        _code_cache["code"] = code
    return _code_cache["code"]


def _code_from_pyc():
    """The marshalled code from our own .pyc, if it matches the source we send."""
    cached = globals().get("__cached__")  # set by the import system, if at all
    if not cached:
        return None
    try:
        import importlib.util

        with open(cached, "rb") as f:
            data = f.read()
        stat = os.stat(__file__)
        header = 16 if sys.version_info >= (3, 7) else 12  # 3.6: no flags word
        mtime, size = struct.unpack("<II", data[header - 8:header])
        if (data[:4] == importlib.util.MAGIC_NUMBER
                and (header == 12 or data[4:8] == b"\0\0\0\0")
                and mtime == int(stat.st_mtime) & 0xFFFFFFFF
                and size == len(_get_source()) & 0xFFFFFFFF):
            return data[header:]
    except (OSError, ValueError, struct.error, ImportError):
        pass
    return None


def _bootstrap(io, params, describe, stage2=_STAGE2_LINE):
    """Bring up execnet_single in the interpreter at the other end of io.

    Returns (rinfo dict, bytes already read past the ready frame).  Raises a
    HostNotFound subclass saying what went wrong, with what the remote
    printed (io.output_text()).  stage2=None: the remote runs our code
    already (a fork server's child); only its ready frame is read.
    """
    gwid = params["id"]
    if stage2 is None:
        return _read_ready(io, describe, gwid, [])
    try:
        io.write(stage2)
    except OSError:
        pass  # the process died already; reading tells why
    # while the remote starts: ready our code for a remote just like us
    _code_for_remote(sys.hexversion, sys.implementation.cache_tag, _abi_tag())
    line, buf, noise = _read_first_line(io, describe, gwid)
    words = line.decode("ascii", "replace").split()
    if words[0] == "execnet_single:too-old":
        raise RemoteTooOld(_Text.TOO_OLD % (words[1], " ".join(words[2:]) or describe),
                           _join_output(noise, io.output_text(2.0)))
    if words[0] != "execnet_single:ok" or len(words) != 4 or buf:
        raise HostNotFound(_Text.BAD_BOOTSTRAP % (gwid, line[:200]),
                           _join_output(noise, io.output_text(2.0)))
    source = _get_source()
    code = _code_for_remote(int(words[1]), words[2], words[3])
    payload = dumps(params)
    try:
        io.write(struct.pack("!III", len(source), len(code), len(payload)) + source + code + payload)
    except OSError:
        pass
    return _read_ready(io, describe, gwid, noise)


def _read_ready(io, describe, gwid, noise):
    """Read the remote's _MSG_READY frame: (rinfo dict, bytes read past it)."""
    reader = _FrameReader()
    frames = []
    while not frames:
        try:   # a sealed session's read refuses what failed its check
            data = io.read()
        except _StreamError as exc:
            raise HostNotFound(str(exc)) from None
        if not data:
            _raise_died(io, describe, gwid, noise)
        try:
            frames = reader.feed(data)
        except LoadError:
            raise HostNotFound(_Text.BAD_BOOTSTRAP % (gwid, data[:200]),
                               _join_output(noise, io.output_text(2.0)))
    code_, cid, ready = frames[0]
    if code_ != _MSG_READY:
        raise HostNotFound(_Text.BAD_BOOTSTRAP % (gwid, frames[0][:2]),
                           _join_output(noise, io.output_text(2.0)))
    leftover = b"".join(
        _encode_frame(code_, cid, b"".join(payload) if type(payload) is _Pieces else payload)
        for code_, cid, payload in frames[1:]) + reader.leftover()
    return _loads(ready), leftover


def _read_first_line(io, describe, gwid):
    """(the execnet_single: line, bytes after it, [noise before it]).

    Lines before it (a login banner, a shell's chatter) are noise: only the
    last _NOISE_KEEP bytes of them are kept, for the error message, so a
    peer that streams them forever cannot grow our memory.
    """
    buf = b""
    noise = b""
    dropped = 0
    while True:
        data = io.read()
        if not data:
            _raise_died(io, describe, gwid, _noise_lines(noise, dropped))
        buf += data
        if b"\n" in data:
            lines = buf.split(b"\n")
            buf = lines.pop()
            for index, line in enumerate(lines):
                if line.startswith(b"execnet_single:"):
                    noise += b"".join(before + b"\n" for before in lines[:index])
                    rest = b"\n".join(lines[index + 1:] + [buf])
                    return line, rest, _noise_lines(noise, dropped)
            noise += b"\n".join(lines) + b"\n"
        if len(buf) > _NOISE_KEEP:   # a line that long is no execnet_single: line
            noise += buf
            buf = b""
        if len(noise) > 2 * _NOISE_KEEP:
            dropped += len(noise) - _NOISE_KEEP
            noise = noise[-_NOISE_KEEP:]


def _noise_lines(noise, dropped):
    lines = noise[-_NOISE_KEEP:].decode("utf-8", "replace").splitlines()
    dropped += max(0, len(noise) - _NOISE_KEEP)
    if dropped:
        lines.insert(0, _Text.NOISE_DROPPED % dropped)
    return lines


def _bootstrap_sealed(io, params, describe):
    """_bootstrap for a sealed socket session (io: a _SealedIO whose inner
    handshake told the server's interpreter): the source goes out as the
    first record; returns (rinfo dict, bytes already read past the ready frame)."""
    gwid = params["id"]
    source = _get_source()
    code = _code_for_remote(io.session[2], io.session[3], io.session[4])
    payload = dumps(params)
    try:
        io.write_boot([struct.pack("!III", len(source), len(code), len(payload)),
                       source, code, payload])
    except OSError:
        pass  # the server dropped us; reading tells why
    return _read_ready(io, describe, gwid, [])


def _join_output(noise, text):
    return "\n".join(noise + ([text] if text else []))


def _raise_died(io, describe, gwid, noise):
    status = io.wait(2.0)
    output = _join_output(noise, io.output_text(2.0))
    if status in (126, 127):
        raise InterpreterNotFound(_Text.NOT_FOUND % (describe, gwid, "exit status %s" % status),
                                  output)
    raise HostNotFound(_Text.DIED_IN_BOOTSTRAP % (describe, gwid, status), output)


def _start_io(io, spec, params, describe, stage2=_STAGE2_LINE):
    """Bootstrap a freshly opened transport; returns (io, rinfo, leftover).

    Shared by every transport: a watchdog kills a remote that does not
    answer within bootstrap_timeout, the transport's own handshake runs
    before any source is sent, and a failed start leaves nothing behind.
    """
    timeout = float(spec.bootstrap_timeout or _BOOTSTRAP_TIMEOUT)
    gave_up = []

    def give_up():
        gave_up.append(True)
        io.kill()  # ends the reads the bootstrap waits in

    cancel_watchdog = _call_later(timeout, give_up)
    try:
        io.handshake()
        if io.session is None:
            rinfo, leftover = _bootstrap(io, params, describe, stage2)
        else:   # plain TCP to a socket server: seal every byte from here on
            io = _SealedIO(io, io.session[1], io.session[0], describe)
            rinfo, leftover = _bootstrap_sealed(io, params, describe)
    except BaseException as exc:
        io.kill()
        io.close_write()
        _reap(io, 1.0)
        io.close_read()
        if gave_up and isinstance(exc, HostNotFound):
            raise HostNotFound(_Text.NO_ANSWER % (describe, spec.id, timeout), exc.output) from None
        raise
    finally:
        cancel_watchdog()
    return io, rinfo, leftover


_later_lock = threading.Lock()
_later = {"pid": None}   # _call_later's state: lock, entries, running thread


def _call_later(delay, func):
    """Call func() in a daemon thread after delay seconds; returns a cancel().

    One thread serves every pending call (a Group's starts share it) and
    ends when none is left: a Timer thread per start cost a thread start
    and its wake-ups each."""
    import time

    token = object()
    with _later_lock:
        if _later["pid"] != os.getpid():   # (new, or a forked copy: no thread here)
            _later.update(pid=os.getpid(), entries={}, thread=None,
                          cond=threading.Condition(threading.Lock()))
        state = _later
    with state["cond"]:
        state["entries"][token] = (time.monotonic() + delay, func)
        if state["thread"] is None:
            state["thread"] = _daemon(_run_later, (state,), "execnet_single-watchdog")
        else:
            state["cond"].notify()

    def cancel():
        with state["cond"]:
            state["entries"].pop(token, None)
            if not state["entries"]:
                state["cond"].notify()   # nothing left: the thread ends now
    return cancel


def _run_later(state):
    import time

    cond = state["cond"]
    while True:
        with cond:
            while True:
                entries = state["entries"]
                if not entries:
                    state["thread"] = None
                    return
                token, (due, func) = min(entries.items(), key=lambda item: item[1][0])
                left = due - time.monotonic()
                if left <= 0:
                    del entries[token]
                    break
                cond.wait(left)
        try:
            func()
        except Exception:
            pass


def _reap(io, timeout):
    """Wait for the remote to end; kill it if it does not in time.  A killed
    process not yet reaped when the time is up is waited for by a daemon
    thread, so that no zombie outlives the bound (exit() keeps to it)."""
    if io.wait(timeout) is None:
        io.kill()
        if io.wait(timeout) is None:
            _daemon(io.wait, (None,), "execnet_single-reaper")


_FLAG_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}
# xspec keys that are on or off: `key` alone, or key= one of _FLAG_VALUES
_FLAG_KEYS = ("dont_write_bytecode", "insecure", "tls", "forward_preload")


def _flag(spec, key):
    """The on/off value of a flag key (None, `key` or key=VALUE)."""
    value = getattr(spec, key)
    if value is None or value is False:
        return False
    if value is True:
        return True
    if not isinstance(value, str) or value.strip().lower() not in _FLAG_VALUES:
        raise ValueError(_Text.BAD_SPEC_VALUE % (key, spec._spec, _Text.BAD_FLAG % key))
    return _FLAG_VALUES[value.strip().lower()]


def _gateway_params(spec, names=()):
    """What the remote needs to know, from an XSpec."""
    params = {
        "id": spec.id,
        "execmodel": spec.execmodel or "thread",
        "window": int(spec.window or _DEFAULT_WINDOW),
        "max_item": int(spec.max_item or _MAX_ITEM),
        "env": dict(spec.env),
        "chdir": spec.chdir if isinstance(spec.chdir, str) else None,
        "nice": spec.nice if isinstance(spec.nice, str) else None,
        "dont_write_bytecode": _flag(spec, "dont_write_bytecode"),
        "names": list(names),
        "force_names": sorted(_alias_state["forced"]),
    }
    if spec.forward:
        params["forward"] = spec.forward
        params["forward_preload"] = _flag(spec, "forward_preload")
    return params


class _PopenIO(_FdIO):
    """A local Python subprocess: protocol on its stdin/stdout."""

    def __init__(self, args, env=None, pass_fds=(), popen=None):
        import subprocess

        self.args = args
        if popen is None:
            popen = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                bufsize=0, env=env, start_new_session=True, pass_fds=pass_fds,
                # Windows ignores start_new_session: the host's Ctrl-C stays its own
                creationflags=_CREATE_NEW_PROCESS_GROUP if _WINDOWS else 0)
        self.popen = popen
        _FdIO.__init__(self, self.popen.stdout.fileno(), self.popen.stdin.fileno())
        self.remoteaddress = str(self.popen.pid)
        self._stderr = []
        self._stderr_lock = threading.Lock()
        self._on_stderr = None   # set once the gateway exists
        self._stderr_thread = _daemon(self._read_stderr, (), "execnet_single-stderr")

    def _read_stderr(self):
        fd = self.popen.stderr.fileno()
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except OSError:
                return
            if not data:
                return
            with self._stderr_lock:
                if self._on_stderr is None:
                    self._stderr.append(data)
                    continue
            self._on_stderr(data)

    def set_output_handler(self, handler):
        """From now on pass stderr bytes to handler (after what came so far)."""
        with self._stderr_lock:
            self._on_stderr = handler
            pending, self._stderr = self._stderr, []
        for data in pending:
            handler(data)

    def output_text(self, timeout=0.0):
        """What the process wrote to stderr (waits for it to end, briefly)."""
        self._stderr_thread.join(timeout)
        return b"".join(self._stderr).decode("utf-8", "replace")

    def wait(self, timeout=0.0):
        import subprocess

        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close_write(self):
        self.wfd = -1
        try:
            self.popen.stdin.close()
        except OSError:
            pass

    def close_read(self):
        """Close stdout (and stderr, once the process is gone)."""
        self.rfd = -1
        try:
            self.popen.stdout.close()
        except OSError:
            pass
        self._stderr_thread.join(1.0)
        if not self._stderr_thread.is_alive():
            self.popen.stderr.close()

    def kill(self):
        """Kill the process and its process group."""
        try:
            # (Windows: the process only; its own children end when their stdin closes)
            _kill_group(self.popen)
        except OSError:
            try:
                self.popen.kill()
            except OSError:
                pass


def _popen_args(spec):
    if spec.python in (None, True):
        return [sys.executable]
    return _split_command(spec.python)


def _start_popen(spec, params, group=None):
    """Start and bootstrap a Python subprocess for spec; returns (io, rinfo, leftover)."""
    args = _popen_args(spec) + ["-c", _STAGE1]
    describe = " ".join(args[:-2])
    env = None
    if spec.env:
        env = dict(os.environ)
        env.update(spec.env)
    try:
        io = _PopenIO(args, env)
    except OSError as exc:
        raise InterpreterNotFound(_Text.NOT_FOUND % (describe, spec.id, exc))
    return _start_io(io, spec, params, describe)


# Warm starts (xspec key preload=NAME,...): a fork server per Group, Python
# and env:, started once like a popen remote but running _fork_server_main.
# It imports the preload modules, stays single-threaded, and forks one child
# per gateway; the child gets its own session, its stdin/stdout/stderr pipes
# (passed as fds over a Unix socket) and calls _remote_main as a fresh
# remote would.  It ends when its stdin (from the host) closes: at
# Group.terminate, at exit, or when the host dies.  A child, like any popen
# remote, ends when its own stdin closes.  What a child shares with its
# siblings: the imported modules and str hash randomization (fixed at
# interpreter start), nothing else this library sets up.
#
# On the Unix socket (SOCK_SEQPACKET, one message each):
#   host -> server: params bytes, with 3 fds (child's stdin, stdout, stderr)
#   server -> host: b"F" !ii (pid, 0)        the child for the last request
#                   b"E" !ii (0, errno)      fork() failed
#                   b"X" !ii (pid, status)   a child ended (returncode style)

_FORK_SERVER_STAGE2_LINE = (
    repr(_STAGE2.replace("mod._remote_main(", "mod._fork_server_main(")) + "\n").encode("ascii")


def _fork_server_main(source, params_bytes):
    """The fork server's main loop (its process's only thread)."""
    global _SOURCE
    _SOURCE = source
    _set_own_spec()
    params = loads(params_bytes)
    _setup_trace()
    import select   # (every child's output forwarder uses it too)

    signal = _c_module("signal")
    socket = _c_module("socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, params["fork_fd"])
    ready_fd = os.dup(1)
    os.dup2(2, 1)   # what preloaded modules print must not reach the protocol
    me = sys.modules[__name__]
    for name in params.get("names", ()):   # as _remote_main: before the preloads import them
        if name not in sys.modules and not _importable(name):
            sys.modules[name] = me
        _names_checked.add(name)   # the children need not look again
    info = {"pid": os.getpid()}
    error = _preload_modules(params["preload"])
    if error is not None:
        info["preload_error"] = error
    os.write(ready_fd, _encode_frame(_MSG_READY, 0, dumps(info)))
    os.close(ready_fd)
    if "preload_error" in info:
        os._exit(1)
    _trace("fork server ready, preloaded", params["preload"])
    # What every child would otherwise do first, once each (while the host
    # reads our READY): the compiler's first use sets up its state (about
    # 1 ms; remote_exec compiles), the output streams' class.
    compile("pass", "<warm-up>", "exec")
    _output_raw_class()
    import gc

    if hasattr(gc, "freeze"):   # 3.7+: the children's collections leave the
        gc.freeze()             # preloaded objects (and their shared pages) alone
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    while True:
        ready = select.select([0, sock, wake_r], [], [])[0]
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except OSError:
                pass
            _reap_forked(sock)
        if 0 in ready and not os.read(0, 512):
            break   # the host closed our stdin: it is gone or ends us
        if sock in ready:
            try:
                data, ancdata = sock.recvmsg(1 << 16, socket.CMSG_SPACE(3 * 4))[:2]
            except OSError:
                break
            if not data:
                break
            fds = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += struct.unpack("%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4])
            if data[:1] == b"I" and not fds:   # import more first (_ForkServer._grow)
                sock.send(b"I" + dumps(_preload_modules(loads(data[1:]))))
                if hasattr(gc, "freeze"):
                    gc.freeze()
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                sock.send(b"E" + struct.pack("!ii", 0, exc.errno or 0))
                continue
            if pid == 0:
                _forked_child(source, data, fds, (sock.fileno(), wake_r, wake_w))
            for fd in fds:
                os.close(fd)
            sock.send(b"F" + struct.pack("!ii", pid, 0))
    os._exit(0)


def _preload_modules(names):
    """Import names in order (in the fork server); (name, error text) of
    the first that fails, or None."""
    for name in names:
        try:
            __import__(name)
        except BaseException as exc:
            return (name, "%s: %s" % (type(exc).__name__, exc))
    return None


def _c_module(name):
    """The C module under name ("_signal" for "signal"), where there is one:
    without the .py module's enum set-up (about 1 ms each), which the fork
    server and its children, needing a few functions only, can do without."""
    try:
        return __import__("_" + name)
    except ImportError:
        return __import__(name)


def _reap_forked(sock):
    """Report every child that ended to the host."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            sock.send(b"X" + struct.pack("!ii", pid, code))
        except OSError:
            pass


def _forked_child(source, params_bytes, fds, server_fds):
    """In a new child of the fork server: become a fresh popen remote."""
    signal = _c_module("signal")
    global _trace
    try:
        os.setsid()   # as start_new_session=True gives a popen remote
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in server_fds:
            os.close(fd)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        random = sys.modules.get("random")
        if random is not None and not hasattr(os, "register_at_fork"):
            random.seed()   # 3.6: no at-fork hook reseeds it
        _trace = _trace_off   # the child traces to a file of its own pid
        _trace_state["setup"] = False
        _remote_main(source, params_bytes)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(1)
    os._exit(0)


# === 9. Local gateways: popen, via, socket, ssh ===

_EXIT_TIMEOUT = _EXIT_GRACE + 1.0   # local: wait this long, then kill

# Warm starts, the host's side (the fork server's is in section 8).
_fork_servers_lock = threading.Lock()


def _start_popen_warm(spec, params, group=None):
    """popen, from the group's fork server if spec has preload= and one applies."""
    if spec.preload:
        server = _fork_server_for(spec, group)
        if server is not None:
            try:
                return server.start(spec, params)
            except HostNotFound:
                if not server.ended():
                    raise
            # it ended before its watcher could tell (killed, say): once
            # more, from the new server that takes its place
            return _fork_server_for(spec, group).start(spec, params)
    return _start_popen(spec, params, group)


def _fork_server_for(spec, group):
    """The group's fork server for spec's Python and env (started on first
    use), or None where a warm start does not apply (traced why)."""
    why = None
    if group is None:
        why = "not started from a Group on this host"
    elif not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        why = "fork server needs Linux"
    elif spec.python not in (None, True) and not _is_own_python(spec.python):
        why = "python=%s is not this interpreter" % spec.python
    if why is not None:
        _trace("gateway", spec.id, "preload=%s ignored, cold start:" % spec.preload, why)
        return None
    preload = tuple(name.strip() for name in spec.preload.split(","))
    key = (spec.python if spec.python is not True else None,
           tuple(sorted(spec.env.items())), preload)
    ended = None
    with _fork_servers_lock:
        servers = group.__dict__.setdefault("_fork_servers", {})
        server = servers.get(key)
        if server is None or server.ended():
            ended = server   # (killed, say): a new one takes its place
            server = servers[key] = _adopt_spare(key) or _ForkServer(preload)
    if ended is not None:
        ended.close()
    server.ensure_started(spec, preload)
    return server


# Spare fork servers: started ahead of any Group (the pytest command starts
# one with the session, so that it imports pytest on another core while
# the session starts).  The first popen spec with no python= and no env:
# whose preload= has all of a spare's modules takes it over for its Group;
# the spare imports the rest before it forks, so the children have exactly
# what the spec asked for.  Spares nobody took are ended by
# _close_spare_fork_servers (or end with this process's end, as every fork
# server does when its stdin closes).
_spare_fork_servers = []


def _start_spare_fork_server(preload):
    """Start a fork server of this interpreter with preload (module names),
    in the background; returns it (None where fork servers do not apply)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return None
    _setup_trace()
    server = _ForkServer(tuple(preload))
    with _fork_servers_lock:
        _spare_fork_servers.append(server)

    def start():
        try:
            server.ensure_started(XSpec("popen//id=spare"))
        except BaseException as exc:   # the group that takes it over sees it
            _trace("spare fork server failed:", exc)
    _daemon(start, (), "execnet_single-spare-forkserver")
    return server


def _adopt_spare(key):
    """The spare fork server that can serve key, taken off the list, or None."""
    python, env, preload = key
    if python is not None or env:
        return None
    for server in _spare_fork_servers:
        if set(server.preload) <= set(preload) and not server.ended():
            _spare_fork_servers.remove(server)
            _trace("spare fork server with", server.preload,
                   "taken for a preload of %d modules" % len(preload))
            return server
    return None


def _close_spare_fork_servers():
    """End the spare fork servers no Group took (after their start)."""
    with _fork_servers_lock:
        spares = list(_spare_fork_servers)
        del _spare_fork_servers[:]
    for server in spares:
        with server._start_lock:   # (its start may still run)
            server.close()


def _is_own_python(command):
    """Does the python= command start this very interpreter?"""
    args = _split_command(command)
    if len(args) != 1:
        return False
    import shutil

    path = shutil.which(args[0])
    return path is not None and os.path.realpath(path) == os.path.realpath(sys.executable)


class _ForkedProcess:
    """The part of subprocess.Popen that _PopenIO uses, for a forked child."""

    def __init__(self, server, pid, stdin_fd, stdout_fd, stderr_fd):
        self.pid = pid
        self._server = server
        self.stdin = open(stdin_fd, "wb", buffering=0)
        self.stdout = open(stdout_fd, "rb", buffering=0)
        self.stderr = open(stderr_fd, "rb", buffering=0)

    def wait(self, timeout=None):
        status = self._server.wait_child(self.pid, timeout)
        if status is None:
            import subprocess

            raise subprocess.TimeoutExpired("forked remote %d" % self.pid, timeout)
        return status

    def kill(self):
        import signal

        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


class _ForkServer:
    """The host's end of one fork server (see the comment above)."""

    def __init__(self, preload):
        self.preload = preload
        self.io = None
        self.error = None
        self._start_lock = threading.Lock()
        self._fork_lock = threading.Lock()
        self._waiting = []               # a _Queue per request sent, oldest first
        self._ended = {}                 # pid: status
        self._cond = threading.Condition(threading.Lock())
        self._gone = False
        self._sock = None
        self._reader = None

    def ensure_started(self, spec, preload=None):
        """Start the server (once); have it import what preload (a tuple)
        adds to its own; raise what its start or those imports raised."""
        with self._start_lock:
            if self.io is None and self.error is None:
                try:
                    self._start(spec)
                except BaseException as exc:
                    self.error = exc
            if self.error is None and preload is not None and preload != self.preload:
                try:
                    self._grow(spec, preload)
                except BaseException as exc:
                    self.error = exc
                    self.close()
            if self.error is not None:
                raise self.error

    def _grow(self, spec, preload):
        """Import the modules of preload the server has not (in its only
        thread, before any later fork): it serves preload from now on."""
        more = [name for name in preload if name not in self.preload]
        waiter = _Queue()
        with self._fork_lock:
            if not self._gone:
                self._sock.send(b"I" + dumps(more))
                self._waiting.append(waiter)
            else:
                waiter.put(None)
        try:
            reply = waiter.get(timeout=float(spec.bootstrap_timeout or _BOOTSTRAP_TIMEOUT))
        except _Empty:
            reply = None
        if reply is None or reply[0] != b"I":
            raise HostNotFound(_Text.FORK_FAILED % (spec.id, self.describe, "it has ended"))
        error = loads(reply[1])
        if error is not None:
            raise HostNotFound(_Text.PRELOAD_FAILED % ((spec.id, spec.preload) + tuple(error)))
        _trace("fork server", self.io.remoteaddress,
               "imported %d more modules for" % len(more), spec.id)
        self.preload = tuple(preload)

    def _start(self, spec):
        import socket

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = _popen_args(spec) + ["-c", _STAGE1]
        describe = " ".join(args[:-2])
        env = None
        if spec.env:
            env = dict(os.environ)
            env.update(spec.env)
        fork_fd = theirs.fileno()
        try:
            try:
                io = _PopenIO(args, env, pass_fds=(fork_fd,))
            except OSError as exc:
                raise InterpreterNotFound(_Text.NOT_FOUND % (describe, spec.id, exc))
            finally:
                theirs.close()
            _widen_pipe(io.wfd)   # the source and code (about 0.9 MB) in fewer wake-ups
            params = {"id": spec.id, "preload": list(self.preload), "fork_fd": fork_fd,
                      "names": _module_names()}
            io, info, leftover = _start_io(io, spec, params, describe, _FORK_SERVER_STAGE2_LINE)
        except BaseException:
            mine.close()
            raise
        if "preload_error" in info:
            output = io.output_text(2.0)
            io.close_write()
            _reap(io, 1.0)
            io.close_read()
            mine.close()
            name, error = info["preload_error"]
            raise HostNotFound(_Text.PRELOAD_FAILED % (spec.id, spec.preload, name, error), output)
        io.set_output_handler(_write_stderr_bytes)
        self.describe = describe
        self.io = io
        self._sock = mine
        self._reader = _daemon(self._read, (), "execnet_single-forkserver")
        _trace("fork server", io.remoteaddress, "started for", describe, "preload", self.preload)

    def _read(self):
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                data = b""
            if data[:1] == b"I" and len(data) > 1:   # the answer to _grow
                with self._fork_lock:
                    waiter = self._waiting.pop(0) if self._waiting else None
                if waiter is not None:
                    waiter.put((b"I", data[1:], 0))
                continue
            if len(data) != 9:
                break
            kind, (pid, value) = data[:1], struct.unpack("!ii", data[1:])
            if kind == b"X":
                with self._cond:
                    self._ended[pid] = value
                    self._cond.notify_all()
            else:   # the answer to the oldest request (the server forks in order)
                with self._fork_lock:
                    waiter = self._waiting.pop(0) if self._waiting else None
                if waiter is not None:
                    waiter.put((kind, pid, value))
        with self._cond:
            self._gone = True
            self._cond.notify_all()
        with self._fork_lock:
            waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.put(None)

    def ended(self):
        """True once the server's socket closed (it ended or failed)."""
        return (self._gone or self.error is not None   # (or it died, unseen yet)
                or (self.io is not None and self.io.popen.poll() is not None))

    def wait_child(self, pid, timeout):
        """The exit status of a child; None while it runs (or is unknown)."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._ended or self._gone, timeout)
            return self._ended.get(pid)

    def start(self, spec, params):
        """Fork a child for a gateway and bootstrap it: (io, rinfo, leftover)."""
        import array
        import socket

        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        theirs = (stdin_r, stdout_w, stderr_w)
        reply = None
        waiter = _Queue()
        try:
            # Requests are not serialized with their answers: a group's
            # gateways are forked back to back, and bootstrap side by side.
            with self._fork_lock:
                if not self._gone:
                    try:
                        self._sock.sendmsg([dumps(params)], [(
                            socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))])
                        self._waiting.append(waiter)
                    except OSError:
                        waiter = None
                else:
                    waiter = None
        finally:
            for fd in theirs:
                os.close(fd)
        if waiter is not None:
            try:
                reply = waiter.get(timeout=float(spec.bootstrap_timeout or _BOOTSTRAP_TIMEOUT))
            except _Empty:   # stuck: later answers would be out of step
                self._gone = True
                self.io.kill()
        if reply is None or reply[0] != b"F":
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            why = "it has ended" if reply is None else os.strerror(reply[2])
            raise HostNotFound(_Text.FORK_FAILED % (spec.id, self.describe, why))
        process = _ForkedProcess(self, reply[1], stdin_w, stdout_r, stderr_r)
        io = _PopenIO(self.io.args, popen=process)
        _trace("gateway", spec.id, "forked as", process.pid, "by fork server", self.io.remoteaddress)
        return _start_io(io, spec, params, self.describe + " (forked)", None)

    def close(self, timeout=1.0):
        """End the server: close its stdin, wait, kill if need be."""
        import time

        io = self.io
        if io is None:
            return
        io.close_write()
        # Its stderr ends as it exits: a prompter sign than Popen.wait's
        # polling (0.5, 1.5, 3.5 ms, ...); looked at in slices, in case a
        # process it started holds that pipe too.
        deadline = time.monotonic() + timeout
        while io.popen.poll() is None and time.monotonic() < deadline:
            io._stderr_thread.join(0.01)
            if not io._stderr_thread.is_alive():
                break
        _reap(io, max(0.0, deadline - time.monotonic()))
        try:
            self._sock.shutdown(2)
        except OSError:
            pass
        self._reader.join(timeout)
        self._sock.close()
        io.close_read()


def _close_fork_servers(group):
    """End every fork server of group (its gateways have ended)."""
    with _fork_servers_lock:
        servers = list(group.__dict__.pop("_fork_servers", {}).values())
    for server in servers:
        server.close()



class RInfo:
    """Facts about the remote interpreter (executable, version_info, ...)."""

    def __init__(self, kwargs):
        self.__dict__.update(kwargs)

    def __repr__(self):
        info = ", ".join("%s=%s" % item for item in sorted(self.__dict__.items()))
        return "<RInfo %r>" % info


RemoteStatus = RInfo


_OUTPUT_DELAY = 0.15          # seconds an unfinished line waits before it is shown
_OUTPUT_HOLD = 64 * 1024      # characters of it held at most; more are shown at once
_STDERR_TAIL = 4096           # bytes of a remote's stderr kept for GatewayDied
_STDERR_LINES = 10            # lines of it shown
_LINE_START, _IN_LINE, _AFTER_CR = range(3)


class _PrefixedStderr:
    """The default output path: what the remote writes to fds 1 and 2 goes to
    the local stderr with "[gw0] " at the start of each line, where a line
    starts after "\n" and after "\r" (a progress redraw keeps the prefix).

    A "\r" is written only once the next text comes, as "\r[gw0] text",
    so the terminal's cursor rests after the text shown ("\r\n" stays a
    line end); the end of the stream ends an unfinished line with "\n".

    Complete lines are written as they arrive; the rest, the unfinished line,
    waits until its line ends, _OUTPUT_DELAY passes (a daemon thread, started
    when first needed, writes it then: the receiver never waits for it), it
    holds _OUTPUT_HOLD characters, or the stream ends.  Holding it keeps
    lines whole on a stderr that several gateways share.

    Each chunk is decoded once and prefixed with str.replace: the cost is
    linear in the bytes received, whatever the line endings.
    """

    def __init__(self, gateway_id):
        import codecs

        self._id = gateway_id
        self._prefix = "[%s] " % (gateway_id,)
        self._decoders = dict((fd, codecs.getincrementaldecoder("utf-8")("replace"))
                              for fd in (1, 2))
        self._state = {1: _LINE_START, 2: _LINE_START}
        self._held = {1: [], 2: []}
        self._held_size = {1: 0, 2: 0}
        self._due = {}       # fd: when its held text is to be shown
        self._cond = threading.Condition(threading.Lock())
        self._thread = None
        self._closed = False

    def feed(self, fd, data):
        """Show data, bytes from the remote's fd (1 or 2)."""
        with self._cond:
            text = self._prefixed(fd, self._decoders[fd].decode(data))
            if self._closed:  # late stderr of the process: nothing waits now
                self._write(self._take(fd) + text + self._ended(fd))
                return
            cut = text.rfind("\n") + 1
            if cut:
                self._write(self._take(fd) + text[:cut])
                text = text[cut:]
            if not text:
                return
            self._held[fd].append(text)
            self._held_size[fd] += len(text)
            if self._held_size[fd] > _OUTPUT_HOLD:
                self._write(self._take(fd))
            elif fd not in self._due:
                import time

                self._due[fd] = time.monotonic() + _OUTPUT_DELAY
                if self._thread is None:
                    self._thread = _daemon(self._show_when_due, (),
                                           "execnet_single-output-%s" % self._id)
                else:
                    self._cond.notify()

    def close(self):
        """The stream ended: show everything, end an unfinished line."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for fd in (1, 2):
                rest = self._prefixed(fd, self._decoders[fd].decode(b"", True))
                self._write(self._take(fd) + rest + self._ended(fd))
            self._cond.notify()

    def _prefixed(self, fd, text):
        """text as shown (see the class doc); updates the state of fd."""
        if not text:
            return ""
        prefix = self._prefix
        state = self._state[fd]
        head = ""
        if state == _AFTER_CR:  # the held "\r": a line end or a redraw
            if text[0] == "\n":
                head, text = "\r\n", text[1:]
            else:
                head = "\r"
            state = _LINE_START
        if not text:
            self._state[fd] = state
            return head
        if state == _LINE_START:
            head += prefix
        if text.endswith("\r\n"):
            body, tail, state = text[:-2], "\r\n", _LINE_START
        elif text.endswith("\n"):
            body, tail, state = text[:-1], "\n", _LINE_START
        elif text.endswith("\r"):
            body, tail, state = text[:-1], "", _AFTER_CR
        else:
            body, tail, state = text, "", _IN_LINE
        self._state[fd] = state
        body = body.replace("\n", "\n" + prefix)
        if "\r" in body:
            body = body.replace("\r", "\r" + prefix).replace("\r" + prefix + "\n", "\r\n")
        return head + body + tail

    def _ended(self, fd):
        """What ends fd's unfinished line (the held "\r" becomes "\n")."""
        state, self._state[fd] = self._state[fd], _LINE_START
        return "" if state == _LINE_START else "\n"

    def _take(self, fd):
        """fd's held text, no longer held (lock held)."""
        self._due.pop(fd, None)
        held = self._held[fd]
        if not held:
            return ""
        self._held[fd] = []
        self._held_size[fd] = 0
        return "".join(held)

    def _show_when_due(self):
        import time

        with self._cond:
            while not self._closed:
                if not self._due:
                    self._cond.wait()
                    continue
                wait = min(self._due.values()) - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                now = time.monotonic()
                for fd in [fd for fd, due in self._due.items() if due <= now]:
                    self._write(self._take(fd))

    @staticmethod
    def _write(text):
        """Write to the stderr of the moment (lock held, so in order)."""
        if not text:
            return
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except Exception:
            pass  # no stderr (interpreter shutdown): nothing to do


class Gateway(_GatewayBase):
    """The local end of a connection to a remote Python interpreter."""

    _group = None

    def __init__(self, io, spec, rinfo, output=None, initial=b""):
        """:private: use makegateway() or Group.makegateway()."""
        _GatewayBase.__init__(self, io, spec.id, 1, "thread",
                              int(spec.window or _DEFAULT_WINDOW),
                              int(spec.max_item or _MAX_ITEM))
        self.spec = spec
        self._cache_rinfo = RInfo(rinfo)
        self._output = output
        self._console = _PrefixedStderr(spec.id) if output is None else None
        self._stderr_tail = b""  # for GatewayDied
        self._exit_stacks = None  # the remote's stacks when asked to exit busy
        io.set_output_handler(lambda data: self._emit_output(2, data))
        self._start_receiver(initial)

    @property
    def remoteaddress(self):
        """Where the remote runs (for popen: its pid)."""
        return self._io.remoteaddress

    # -- output --

    def _on_output(self, fd, payload):
        if fd != 1 and fd != 2:   # a broken (or hostile) remote
            raise LoadError(_Text.BAD_OUTPUT_FD % fd)
        self._emit_output(fd, payload)

    def _emit_output(self, fd, data):
        if fd == 2:
            self._stderr_tail = (self._stderr_tail + data)[-_STDERR_TAIL:]
        target = self._output
        if target is not None:
            try:
                if callable(target):
                    target(fd, data)
                else:
                    target.write(data.decode("utf-8", "replace"))
            except Exception as exc:
                _log(40, "gateway %s: output handler failed: %r" % (self.id, exc))
            return
        self._console.feed(fd, data)

    def _finished_receiving(self, error=None):
        _GatewayBase._finished_receiving(self, error)
        if self._console is not None:
            self._console.close()

    def _connection_error(self, error):
        if self._exit_requested:
            return None  # we asked it to go: a plain end of stream
        reason = str(error) if error is not None else self._io.death_reason()
        self._io.output_text(0.2)  # lets the stderr reader deliver the last bytes
        lines = self._stderr_tail.decode("utf-8", "replace").splitlines()[-_STDERR_LINES:]
        text = reason or _Text.DIED_UNKNOWN
        if lines:
            text += "\n%s\n%s" % (_Text.STDERR_TAIL, "\n".join("  " + l for l in lines))
        self._death = GatewayDied(text)
        return EOFError(_Text.CONNECTION_LOST % (self.id, ": %s" % reason if reason else ""))

    # -- remote execution --

    def remote_exec(self, source, **kwargs):
        """Run source remotely with a `channel` in its namespace; return the channel.

        source is a string (dedented), a module (its source) or a function
        taking `channel` first, called remotely as func(channel, **kwargs).
        """
        call_name = filename = None
        if isinstance(source, type(sys)):
            import inspect

            filename = inspect.getsourcefile(source)
            source = inspect.getsource(source)
        elif isinstance(source, type(_function_source)):
            call_name = source.__name__
            filename, source = _function_source(source)
        else:
            import textwrap

            source = textwrap.dedent(str(source))
        if kwargs and not call_name:
            raise TypeError("can't pass kwargs to non-function remote_exec")
        payload = dumps((source, filename, call_name, kwargs))
        channel = self.newchannel()
        self._send(_MSG_EXEC, channel.id, payload)
        return channel

    def call(self, func, *args, **kwargs):
        """Run func(*args, **kwargs) remotely and return its value (section 11)."""
        return _call_client(self).call(func, args, kwargs)

    def call_async(self, func, *args, **kwargs):
        """Start func(*args, **kwargs) remotely; return a concurrent.futures.Future."""
        return _call_client(self).submit(func, args, kwargs)

    def set_call_limit(self, limit):
        """How many calls the remote runs at once (default 8; excess ones wait)."""
        _call_client(self).set_limit(limit)

    def remote_status(self):
        """Ask the remote how many channels and tasks it has."""
        channel = self.newchannel()
        self._send(_MSG_STATUS, channel.id)
        status = channel.receive()
        self._local_close(channel.id)
        return RemoteStatus(status)

    def _rinfo(self, update=False):
        """executable, version_info, platform, cwd and pid of the remote (cached)."""
        if update:
            channel = self.remote_exec(
                "import execnet_single\nchannel.send(execnet_single._rinfo_dict())")
            self._cache_rinfo = RInfo(channel.receive())
            channel.waitclose()
        return self._cache_rinfo

    def reconfigure(self, py2str_as_py3str=True, py3str_as_py2str=False):
        """Accepted for execnet compatibility; both ends are Python 3."""
        self._strconfig = (py2str_as_py3str, py3str_as_py2str)

    # -- ending --

    def exit(self):
        """Shut the remote down: ask it, wait a grace period, then kill it.

        Returns within about _EXIT_TIMEOUT + 2 seconds, whatever other
        threads are doing (a sender stuck on a remote that does not read is
        woken with OSError when the remote is killed).
        """
        import time

        group = self._group
        if group is not None:
            group._unregister(self)
        self._request_exit()
        self._await_exit(time.time() + _EXIT_TIMEOUT)
        self._kill_if_alive()
        self._finish_exit(time.time() + 1.0)

    def join(self, timeout=None):
        """Wait for the receiver thread to end."""
        if self._receiver is not None and self._receiver is not threading.current_thread():
            self._receiver.join(timeout)

    def _request_exit(self, grace=None):
        """Ask the remote to go; never blocks.  The flusher sends the
        request and then closes our write side (under the write lock, so no
        sender writes to a closed and maybe reused fd).  grace: how long its
        running code may take to finish, if longer than _EXIT_GRACE."""
        self._exit_requested = True
        self._close_requested = True
        self._queue_frame(_encode_frame(
            _MSG_TERMINATE, 0, b"" if grace is None else _GRACE.pack(grace)))
        if self._flusher is None:  # never started: nothing else writes
            self._io.close_write()

    def _await_exit(self, deadline):
        import time

        self.join(max(0.0, deadline - time.time()))

    def _kill_if_alive(self):
        if self.hasreceiver():
            _trace(self.id, "did not exit in time: killing")
            stacks = self._exit_stacks
            if stacks:
                prefix = "[%s] " % (self.id,)
                text = "%s\n%s" % (_Text.STACKS_KILLED, stacks[:_STACKS_LIMIT])
                try:
                    sys.stderr.write("".join(prefix + line + "\n"
                                             for line in text.splitlines()))
                    sys.stderr.flush()
                except Exception:
                    pass
            self._io.kill()

    def _on_stacks(self, cid, payload):
        if cid == 0:  # the remote was busy when asked to exit
            self._exit_stacks = _loads(payload)

    def remote_stacks(self, timeout=10.0):
        """Every thread's stack in the remote, as text; answered even while
        its main thread is busy (TimeoutError if it does not answer in time)."""
        channel = self.newchannel()
        self._send(_MSG_STACKS, channel.id)
        try:
            return channel.receive(timeout)
        finally:
            self._local_close(channel.id)

    def remote_init_threads(self, num=None):
        """execnet's deprecated no-op, kept so its callers keep working."""

    def _finish_exit(self, deadline):
        """After a kill: let the receiver see the end, reap, release fds."""
        import time

        self.join(max(0.0, deadline - time.time()))
        _reap(self._io, max(0.0, deadline - time.time()))
        # the flusher closes our write side; if it has ended already, we do
        if self._wlock.acquire(timeout=max(0.0, deadline - time.time())):
            try:
                self._io.close_write()
            finally:
                self._wlock.release()
        if not self.hasreceiver():
            self._io.close_read()


def _function_source(function):
    """(filename, source padded to its real line numbers) of a pure function."""
    import inspect
    import textwrap

    if function.__name__ == "<lambda>":
        raise ValueError("can't evaluate lambda functions")
    params = list(inspect.signature(function).parameters)
    if not params or params[0] != "channel":
        raise ValueError("expected first function argument to be `channel`")
    if function.__closure__:
        raise ValueError("functions with closures can't be passed")
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except OSError as exc:
        raise ValueError("can't find source file for %s" % function) from exc
    used = _non_builtin_globals(source, function.__code__)
    if used:
        raise ValueError("the use of non-builtin globals isn't supported", used)
    filename = inspect.getsourcefile(function)
    return filename, "\n" * (function.__code__.co_firstlineno - 1) + source


def _non_builtin_globals(source, code):
    import ast
    import builtins

    local = set()
    todo = [code]
    while todo:
        c = todo.pop()
        local.update(c.co_varnames, c.co_cellvars, c.co_freevars)
        todo.extend(k for k in c.co_consts if isinstance(k, type(code)))
    local.add(code.co_name)
    return sorted({
        node.id for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Name) and node.id not in local
        and not hasattr(builtins, node.id)
    })


class _ChannelIO(_IO):
    """A byte stream carried by a channel of another gateway (for via=).

    The relay in the proxy's process (_serve_via) writes what arrives to
    the new process and sends back what it prints; `killer` is a channel
    on which a message makes the relay kill that process at once.
    """

    def __init__(self, channel, killer):
        self.channel = channel
        self.killer = killer
        self.remoteaddress = "via %s" % (channel.gateway.id,)

    def read(self):
        try:
            return self.channel.receive()
        except EOFError:
            return b""
        except (RemoteError, OSError) as exc:
            # the relay says why the stream ended: pass the reason on
            raise _StreamError("via %s: %s" % (self.channel.gateway.id, str(exc).strip()))

    def write(self, data):
        self.channel.send(bytes(data))

    def close_write(self):
        self.channel._close_sending()

    def kill(self):
        """Have the relay kill the process now; wake our blocked senders."""
        try:
            self.killer.send("kill")
        except OSError:
            pass
        self.close_write()

    def close_read(self):
        """Nothing to close: the channel ends with the relay.  What the relay
        still says of the process (how it ended) reaches nobody now, and is
        not the user's unhandled error: it is not reported when collected."""
        self.channel._unread_errors_ok = True
        self.killer._unread_errors_ok = True


def _start_via(spec, params, group):
    """Start spec's process from inside the proxy's process; returns (io, rinfo, leftover)."""
    proxy = group[spec.via]
    control = proxy.remote_exec("import execnet_single\nexecnet_single._serve_via(channel)")
    iochannel = proxy.newchannel()
    killer = proxy.newchannel()
    control.send((iochannel, killer, str(spec), params))
    reply = control.receive()
    if reply[0] != "ok":
        kind = {"InterpreterNotFound": InterpreterNotFound,
                "RemoteTooOld": RemoteTooOld}.get(reply[1], HostNotFound)
        raise kind("%s (via %s)" % (reply[2], proxy.id), reply[3])
    return _ChannelIO(iochannel, killer), reply[1], reply[2]


def _serve_via(channel):
    """In the proxy's process: start a gateway's process and relay its bytes.

    Two threads relay, one each way, so a process that stops reading stalls
    only its own channel (whose window bounds what waits here), never the
    proxy's receiver thread or the other gateways through it.
    """
    iochannel, killer, specstr, params = channel.receive()
    spec = XSpec(specstr)
    spec.id = params["id"]
    try:
        io, rinfo, leftover = _transport_for(spec, nested=True)(spec, params, None)
    except HostNotFound as exc:
        channel.send(("error", type(exc).__name__, exc.message, exc.output))
        return
    except ValueError as exc:
        channel.send(("error", "HostNotFound", str(exc), ""))
        return
    gateway = channel.gateway
    gateway._relayed.append(io)
    io.set_output_handler(_write_stderr_bytes)
    killer.setcallback(lambda message: io.kill())
    # forward=: read the frames going by and answer from this hop's cache
    # (section 12); a sealed stream is never read, and without forward= the
    # relay only copies bytes
    relay = None
    if params.get("forward") and not isinstance(io, _SealedIO):
        relay = _HopRelay(io, _forward_allowed(params["forward"]),
                          params.get("forward_preload"))
        leftover = relay.up(leftover)
    write = io.write if relay is None else relay.down

    def to_child():
        try:
            for data in iochannel:
                write(data)
        except (OSError, RemoteError):
            pass
        io.close_write()
        _reap(io, _EXIT_TIMEOUT)

    def from_child():
        while True:
            try:
                data = io.read()
            except _StreamError:   # a sealed session broken: death_reason() says how
                break
            if not data:
                break
            if relay is not None:
                data = relay.up(data)
                if not data:
                    continue   # all of it answered here
            try:
                iochannel.send(data)
            except OSError:
                break
        reason = io.death_reason() if io.wait(0.0) != 0 else None
        _reap(io, _EXIT_TIMEOUT)
        io.close_read()
        if io in gateway._relayed:
            gateway._relayed.remove(io)
        try:
            iochannel.close(reason or None)
        except OSError:
            pass

    for target in (to_child, from_child):
        _daemon(target, (), "execnet_single-via-%s" % spec.id)
    channel.send(("ok", rinfo, leftover))


# --- Socket transport and its authentication ---
#
# Before either side acts on a byte from the other, both prove they hold the
# same key K (HMAC-SHA256, nonces of 32 fresh random bytes from `secrets`):
#
#   from    size  field
#   server  23    _AUTH_MAGIC  b"execnet_single-auth v2\n"
#   server  32    nonce_s
#   client  32    nonce_c
#   client  32    HMAC(K, b"client" + nonce_s + nonce_c)
#   server  1     n, the size of info
#   server  n     info, ASCII: b"S <sys.hexversion> <cache_tag> <_abi_tag()>" (a sealed
#                 session in a child running the server's own interpreter)
#                 or b"T" (TLS carries the session)
#   server  32    HMAC(K, b"server" + nonce_c + nonce_s + info)
#
# The labels differ per direction, so neither answer can be reflected as the
# other; fresh nonces on both sides make a recorded exchange worthless.  The
# server drops a client with a wrong MAC; the client refuses a server with a
# wrong one (a fake server).  A server run with --insecure sends _OPEN_MAGIC
# (same length) and nothing else.  Every read has a fixed size and a deadline.
#
# Over plain TCP every later byte, both ways, travels in records sealed with
# a key per direction (_SealedIO, section 4):
#   client to server  HMAC(K, b"c2s" + nonce_c + nonce_s)
#   server to client  HMAC(K, b"s2c" + nonce_c + nonce_s)
# The first record is the bootstrap (_STAGE1_SEALED, section 8), sent to a
# fresh interpreter the server started for this client alone; the info
# tells the client which interpreter that is, so no unauthenticated byte
# precedes it.  Under TLS the usual bootstrap runs, and TLS protects it.

_AUTH_MAGIC = b"execnet_single-auth v2\n"
_OPEN_MAGIC = b"execnet_single-open v2\n"
_NONCE_SIZE = 32
_MAC_SIZE = 32
_KEY_ENV = "EXECNET_SINGLE_KEY"
_HANDSHAKE_TIMEOUT = 10.0   # seconds; the xspec key handshake_timeout= overrides
_DROP_SOON = 0.5            # seconds: a close sooner than that is a drop, not a timeout


def _mac(key, label, first, second):
    import hashlib
    import hmac

    return hmac.new(key, label + first + second, hashlib.sha256).digest()


def _recv_exact(sock, size, deadline):
    """Up to size bytes (fewer only at end of stream); socket.timeout past deadline."""
    import socket
    import time

    data = b""
    while len(data) < size:
        remaining = deadline - time.time()
        if remaining <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _client_auth(sock, key, timeout, where, allow_open=False):
    """Client side of the handshake; raises AuthenticationError.

    Returns None (an open or TLS server) or the session to seal:
    (client-to-server key, server-to-client key, hexversion, cache_tag).
    """
    import hmac
    import secrets
    import socket
    import time

    start = time.time()
    deadline = start + timeout
    try:
        try:
            magic = _recv_exact(sock, len(_AUTH_MAGIC), deadline)
        except socket.timeout:
            raise
        except OSError as exc:   # reset before a greeting: dropped, not TLS
            raise AuthenticationError(_Text.DROPPED_AT_ONCE % where + " (%s)" % exc) from None
        if magic == _OPEN_MAGIC:
            if allow_open:
                return
            raise AuthenticationError(_Text.SERVER_OPEN % where)
        if magic != _AUTH_MAGIC:
            if not magic:
                # A TLS server waits for our hello, then its handshake
                # timeout ends the connection; one that drops us does so at once.
                waited = time.time() - start
                if waited < _DROP_SOON:
                    raise AuthenticationError(_Text.DROPPED_AT_ONCE % where)
                raise AuthenticationError(_Text.NO_GREETING % (where, waited))
            raise AuthenticationError(_Text.NOT_A_SERVER % (where, magic))
        if key is None:
            raise AuthenticationError(_Text.NO_KEY % where)
        nonce_s = _recv_exact(sock, _NONCE_SIZE, deadline)
        if len(nonce_s) != _NONCE_SIZE:
            raise AuthenticationError(_Text.CLIENT_REJECTED % where)
        nonce_c = secrets.token_bytes(_NONCE_SIZE)
        sock.settimeout(max(0.01, deadline - time.time()))
        sock.sendall(nonce_c + _mac(key, b"client", nonce_s, nonce_c))
        size = _recv_exact(sock, 1, deadline)
        info = _recv_exact(sock, ord(size), deadline) if size else b""
        proof = _recv_exact(sock, _MAC_SIZE, deadline)
    except socket.timeout:
        raise AuthenticationError(_Text.AUTH_TIMEOUT % (where, timeout)) from None
    except OSError as exc:
        raise AuthenticationError(_Text.CLIENT_REJECTED % where + " (%s)" % exc) from None
    if len(proof) != _MAC_SIZE:
        raise AuthenticationError(_Text.CLIENT_REJECTED % where)
    if not hmac.compare_digest(proof, _mac(key, b"server", nonce_c, nonce_s + info)):
        raise AuthenticationError(_Text.FAKE_SERVER % where)
    words = info.decode("ascii", "replace").split()
    if words == ["T"]:
        return None
    if len(words) != 4 or words[0] != "S" or not words[1].isdigit():
        raise AuthenticationError(_Text.SEAL_MISMATCH % (where, info))
    return (_mac(key, b"c2s", nonce_c, nonce_s), _mac(key, b"s2c", nonce_c, nonce_s),
            int(words[1]), words[2], words[3])


def _server_auth(sock, key, deadline, sealed=True):
    """Server side of the handshake; raises AuthenticationError (or OSError).

    Returns the session keys (client-to-server, server-to-client) for a
    sealed session, else None.
    """
    import hmac
    import secrets

    nonce_s = secrets.token_bytes(_NONCE_SIZE)
    sock.sendall(_AUTH_MAGIC + nonce_s)
    answer = _recv_exact(sock, _NONCE_SIZE + _MAC_SIZE, deadline)
    if len(answer) != _NONCE_SIZE + _MAC_SIZE:
        raise AuthenticationError(_Text.DROP_SHORT % len(answer))
    nonce_c, mac = answer[:_NONCE_SIZE], answer[_NONCE_SIZE:]
    if not hmac.compare_digest(mac, _mac(key, b"client", nonce_s, nonce_c)):
        raise AuthenticationError(_Text.DROP_BAD_MAC)
    info = b"T"
    if sealed:
        info = ("S %d %s %s" % (sys.hexversion, sys.implementation.cache_tag,
                                 _abi_tag())).encode("ascii")
    sock.sendall(struct.pack("!B", len(info)) + info
                 + _mac(key, b"server", nonce_c, nonce_s + info))
    if sealed:
        return _mac(key, b"c2s", nonce_c, nonce_s), _mac(key, b"s2c", nonce_c, nonce_s)
    return None


def _read_key_file(path):
    """The key in path; refuses a file that others may read or write, or
    that belongs to another user (who could then run code as us)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise AuthenticationError(_Text.KEY_UNREADABLE % (path, exc.strerror or exc))
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if _WINDOWS:
            pass   # no modes or uids to check: see _check_key_dir
        elif mode & 0o077:
            raise AuthenticationError(_Text.KEY_UNSAFE % (path, mode, path))
        elif info.st_uid not in (os.geteuid(), 0):
            raise AuthenticationError(_Text.KEY_NOT_OWNED % (path, info.st_uid, os.geteuid()))
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return _check_key(data.strip(), path)


def _check_key(key, where):
    if len(key) < 16:
        raise AuthenticationError(_Text.KEY_TOO_SHORT % (where, len(key)))
    return key


def _env_key():
    """The key from $EXECNET_SINGLE_KEY, or None."""
    value = os.environ.get(_KEY_ENV)
    if not value:
        return None
    return _check_key(value.strip().encode("utf-8"), "$" + _KEY_ENV)


def _write_new_key(path, force=False):
    """Write a fresh random key to path (mode 0600, directory 0700); return path."""
    import binascii
    import secrets

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    if force and os.path.lexists(path):
        os.remove(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AuthenticationError(_Text.KEY_EXISTS % path) from None
    try:
        os.write(fd, binascii.hexlify(secrets.token_bytes(32)) + b"\n")
    finally:
        os.close(fd)
    return path


def _check_key_dir(path):
    """Refuse the directory of the per-user key file (and the one above it)
    if another user owns it or others may write to it: they could swap
    the key.

    Windows: nothing is checked here or in _read_key_file.  Its modes are
    only a read-only bit and its owners are ACLs; a key file in the user's
    profile (the default) is private by the ACLs Windows gives profiles.
    """
    import stat

    if _WINDOWS:
        return
    directory = os.path.dirname(os.path.abspath(path))
    for where in (directory, os.path.dirname(directory)):
        try:
            info = os.stat(where)
        except OSError:
            continue   # not made yet: _write_new_key makes it private
        if info.st_uid not in (os.geteuid(), 0) or info.st_mode & 0o022:
            raise AuthenticationError(_Text.KEY_DIR_UNSAFE % (
                where, info.st_uid, stat.S_IMODE(info.st_mode), path))


def _default_key_path():
    """The per-user key file: $XDG_CONFIG_HOME (or ~/.config)/execnet_single/server.key."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config")
    return os.path.join(base, "execnet_single", "server.key")


class _SocketIO(_IO):
    """A connected TCP socket (maybe TLS) to an execnet_single socket server."""

    def __init__(self, sock, remoteaddress, key=None, allow_open=False,
                 timeout=_HANDSHAKE_TIMEOUT):
        self.sock = sock
        self.remoteaddress = remoteaddress
        self._key = key
        self._allow_open = allow_open
        self._timeout = timeout
        self._write_closed = False
        self._killed = False

    def handshake(self):
        """Prove we hold the key and check that the server does."""
        self.session = _client_auth(self.sock, self._key, self._timeout,
                                    self.remoteaddress, self._allow_open)
        self._key = None
        self.sock.settimeout(None)

    def read(self):
        """The next bytes; b'' at end of stream or once killed."""
        try:
            return self.sock.recv(_READ_SIZE)
        except OSError as exc:
            import errno

            if not self._killed and getattr(exc, "errno", None) not in (
                    errno.ECONNRESET, errno.EPIPE, errno.EBADF):
                self._read_error = exc
                _log(40, "read from %s failed: %s" % (self.remoteaddress, exc))
            return b""

    def write(self, data):
        """Send all of data (OSError once the peer is gone or we closed)."""
        if self._write_closed:
            raise BrokenPipeError("connection to %s closed for writing" % self.remoteaddress)
        self.sock.sendall(data)

    def close_write(self):
        """End of stream for the server (TLS has no half-close: the remote ends
        on _MSG_TERMINATE, and kill() closes the connection)."""
        if self._write_closed:
            return
        self._write_closed = True
        import socket
        import ssl

        if not isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close_read(self):
        """Release the socket."""
        self._close()

    def kill(self):
        """Cut the connection: the server's session sees it and ends.

        An abortive close (RST): a graceful one would queue behind unsent
        data that a remote which stopped reading never takes.
        """
        import socket

        self._killed = True
        self._write_closed = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._close()

    def _close(self):
        import socket

        try:
            # a raw shutdown wakes threads blocked in recv/sendall (also under TLS)
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def death_reason(self):
        if self._read_error is not None:
            return "read from %s failed: %s" % (self.remoteaddress, self._read_error)
        return "socket server %s closed the connection" % self.remoteaddress


def _split_hostport(value, specstr):
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(_Text.BAD_SPEC_VALUE % ("socket", specstr, _Text.BAD_HOSTPORT))
    return host, int(port)


def _tls_1_2_or_later(context):
    """Refuse TLS 1.0 and 1.1 whatever this Python's or OpenSSL's default
    (3.6-3.9 leave them on where the system's OpenSSL allows them)."""
    import ssl

    if hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:  # 3.6: no minimum_version yet
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


def _client_tls_context(spec):
    """An ssl context for spec's tls keys, or None for plain TCP."""
    if not (_flag(spec, "tls") or spec.tls_ca or spec.tls_cert):
        return None
    import ssl

    context = ssl.create_default_context(
        cafile=spec.tls_ca if isinstance(spec.tls_ca, str) else None)
    _tls_1_2_or_later(context)
    if isinstance(spec.tls_cert, str):
        context.load_cert_chain(spec.tls_cert,
                                spec.tls_key if isinstance(spec.tls_key, str) else None)
    return context


def _start_socket(spec, params, group=None):
    """Connect to a socket server, authenticate and bootstrap; returns (io, rinfo, leftover).

    With installvia=ID the server is first started inside gateway ID's
    process, for this one client, with a one-time key handed over on that
    gateway's channel (the seed's triangle); socket=HOST:PORT then says
    where it listens (default 127.0.0.1, a free port).
    """
    import socket

    key = None
    if spec.installvia:
        host, port, key = _install_server(group[spec.installvia], spec)
    elif not isinstance(spec.socket, str):
        raise ValueError(_Text.BAD_SPEC_VALUE % ("socket", spec._spec, _Text.BAD_HOSTPORT))
    else:
        host, port = _split_hostport(spec.socket, spec._spec)
    where = "%s:%d" % (host, port)
    if key is not None:
        pass
    elif isinstance(spec.keyfile, str):
        key = _read_key_file(spec.keyfile)
    else:
        key = _env_key()
    insecure = _flag(spec, "insecure")
    if key is None and not insecure:
        raise AuthenticationError(_Text.NO_KEY % spec.id)
    timeout = float(spec.handshake_timeout or _HANDSHAKE_TIMEOUT)
    try:
        context = _client_tls_context(spec)
        sock = socket.create_connection((host, port), timeout)
    except OSError as exc:
        raise HostNotFound(_Text.CONNECT_FAILED % (spec.id, where, exc))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
    except (OSError, ValueError) as exc:   # 3.6: a wrong host name is a ValueError
        sock.close()
        raise HostNotFound(_Text.CONNECT_FAILED % (spec.id, where, exc))
    io = _SocketIO(sock, where, key, insecure, timeout)
    return _start_io(io, spec, params, "socket server " + where)


def _install_server(proxy, spec):
    """Start a one-client socket server in proxy's process: (host, port, key)."""
    import binascii
    import secrets

    bind = ("127.0.0.1", 0)
    if isinstance(spec.socket, str):
        bind = _split_hostport(spec.socket, spec._spec) if ":" in spec.socket else (
            spec.socket, 0)
    key = binascii.hexlify(secrets.token_bytes(32))
    channel = proxy.remote_exec("import execnet_single\n"
                                "execnet_single._serve_installed(channel)")
    channel.send((bind[0], bind[1], key))
    try:
        host, port = channel.receive(timeout=float(spec.bootstrap_timeout or _BOOTSTRAP_TIMEOUT))
    except (EOFError, RemoteError, TimeoutError) as exc:
        raise HostNotFound(_Text.INSTALL_FAILED % (spec.id, proxy.id, exc))
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return host, port, key


# --- ssh transport ---
#
# The system `ssh` client (never prompting: BatchMode) runs the remote
# interpreter as `python -c _STAGE1`; the bootstrap sends the source over
# ssh's stdin, so nothing is written on the remote disk.  env: is exported by
# the remote shell before the interpreter starts; chdir= and nice= are
# applied by _remote_main, as for popen.
#
# Gateways of one Group to the same ssh destination share one connection
# (OpenSSH multiplexing), set up by the first gateway's own ssh: with
# ControlMaster=yes and ControlPersist it connects, authenticates, opens the
# control socket (in a private 0700 directory made on first use, removed at
# exit), forks the master into the background and goes on as the master's
# first client.  So the first gateway pays nothing for the sharing (no
# connection or remote session of the master's own, no waiting for it: a
# gateway alone starts as fast as a plain ssh), and the others wait only
# until the socket appears, then attach to it: N gateways cost one TCP
# connection and one authentication.  The master is no child of ours: we
# ask it to end on its socket (the multiplexing protocol's terminate
# request) when its last gateway closes and at Group.terminate and exit.
# Should this process die first, its gateways' sessions end with their
# stdin and the master follows _SSH_PERSIST seconds after the last one, so
# no master outlives us for long.  Inside a via= proxy (no group) each ssh
# connects on its own.
#
# The other gateways need no session either: the first gateway's remote
# process runs a spawner, a socket server on the host's loopback with a
# one-time key (sent in its bootstrap parameters), and they reach it with
# `ssh -W 127.0.0.1:PORT` through the master, then start like socket
# gateways: no login shell, no interpreter search, one fork of the first
# gateway's interpreter's executable each.  A spec that would not fit
# (other python= or env:), a first gateway with chdir= or nice= (which its
# children would inherit), or a spawner out of reach (AllowTcpForwarding
# no, a python= prefix in another network namespace) falls back to a
# session of its own.
#
# Dead links: the ssh that holds the connection sends a keepalive every
# _SSH_ALIVE_INTERVAL seconds and gives up after _SSH_ALIVE_COUNT unanswered
# ones; then every gateway on that connection sees the end of its stream.

_SSH_ALIVE_INTERVAL = 5     # seconds: a cut link is noticed in 15-20 seconds
_SSH_ALIVE_COUNT = 3
_SSH_CONNECT_TIMEOUT = 10   # seconds for TCP connect and banner
_SSH_PERSIST = 1            # seconds a master outlives its last session unasked
_ssh_state = {"dir": None, "masters": 0}
_ssh_lock = threading.Lock()

# What ssh printed -> which error (first match wins: a host key error also
# mentions the connection, an authentication error is no connection error).
_SSH_ERRORS = (
    ("Could not resolve hostname", "SshNameNotResolved"),
    ("Host key verification failed", "SshHostKeyError"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "SshHostKeyError"),
    ("host key is known", "SshHostKeyError"),
    ("Permission denied", "SshAuthenticationFailed"),
    ("Too many authentication failures", "SshAuthenticationFailed"),
    ("Connection refused", "SshConnectionFailed"),
    ("timed out", "SshConnectionFailed"),
    ("No route to host", "SshConnectionFailed"),
    ("Network is unreachable", "SshConnectionFailed"),
    ("Connection reset", "SshConnectionFailed"),
    ("Connection closed", "SshConnectionFailed"),
    ("kex_exchange_identification", "SshConnectionFailed"),
)


def _ssh_error(spec, status, stderr):
    """The exception for an ssh that exited with status (255: ssh's own failure)."""
    kind = SshError
    for marker, name in _SSH_ERRORS:
        if marker in stderr:
            kind = globals()[name]
            break
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    return kind(_Text.SSH_FAILED % (spec.id, spec.ssh, status, last), stderr)


def _ssh_options(spec):
    """ssh options for every connection of spec (ssh takes the first value it
    sees for an option, so the user's own -o in ssh= comes before these)."""
    args = ["-T", "-o", "BatchMode=yes",
            "-o", "ServerAliveInterval=%d" % _SSH_ALIVE_INTERVAL,
            "-o", "ServerAliveCountMax=%d" % _SSH_ALIVE_COUNT,
            "-o", "ConnectTimeout=%d" % _SSH_CONNECT_TIMEOUT]
    if isinstance(spec.ssh_config, str):
        args += ["-F", spec.ssh_config]
    return args


def _ssh_remote_command(spec):
    """The command line the remote shell runs: exports, then the interpreter."""
    import re
    import shlex

    parts = []
    for name, value in sorted(spec.env.items()):
        if not re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", name):
            raise ValueError(_Text.BAD_SPEC_VALUE % ("env:" + name, spec._spec,
                                                     _Text.SSH_BAD_ENV_NAME))
        parts.append("export %s=%s;" % (name, shlex.quote(value)))
    stage1 = shlex.quote(_STAGE1)
    if spec.python in (None, True):
        # a modern host may have python3 only, an old one python only
        parts.append("for p in python3 python; do command -v $p >/dev/null 2>&1 && "
                     "exec $p -c %s; done; echo %s >&2; exit 127"
                     % (stage1, shlex.quote("execnet_single: " + _Text.SSH_NO_PYTHON)))
    else:
        # a command line for the remote shell, e.g. `ip netns exec NAME python3`
        parts.append("%s -c %s" % (spec.python, stage1))
    return " ".join(parts)


def _ssh_control_dir():
    """The private directory of the control sockets (made once; the exit
    handler removes it after the groups, and so the masters, have ended)."""
    with _ssh_lock:
        if _ssh_state["dir"] is None:
            import tempfile

            _ssh_state["dir"] = tempfile.mkdtemp(prefix="execnet_single-ssh-")  # mode 0700
        return _ssh_state["dir"]


def _remove_ssh_control_dir():
    import shutil

    with _ssh_lock:
        path, _ssh_state["dir"] = _ssh_state["dir"], None
    if path is not None:
        shutil.rmtree(path, True)


class _SshMaster:
    """A shared ssh connection of a group: its control socket and its users.

    Made by the first gateway to the destination, whose ssh starts the
    master; settled is set once the socket is there or that start ended
    (error: its failure of ssh itself, which the waiting gateways share).
    """

    def __init__(self, masters, key, path):
        self.masters = masters   # the group's registry, which this one leaves last
        self.key = key
        self.path = path
        self.users = 0
        self.error = None
        self.settled = threading.Event()
        # the first gateway's spawner: (port, key, python, env) or None;
        # spawned is set once that gateway's start ended either way
        self.spawner = None
        self.spawned = threading.Event()

    def first_options(self):
        """The first gateway's ssh becomes the master (and its first client)."""
        _daemon(self._watch, (), "execnet_single-ssh-master")
        return ["-o", "ControlMaster=yes", "-o", "ControlPersist=%d" % _SSH_PERSIST,
                "-o", "ControlPath=" + self.path]

    def _watch(self):
        import time

        while not self.settled.is_set() and not os.path.exists(self.path):
            time.sleep(0.002)
        self.settled.set()

    def client_options(self, spec):
        """Wait for the master, then the options that attach a gateway's ssh to it."""
        timeout = float(spec.bootstrap_timeout or _BOOTSTRAP_TIMEOUT)
        if not self.settled.wait(timeout):
            raise SshError(_Text.NO_ANSWER % ("ssh " + spec.ssh, spec.id, timeout))
        if os.path.exists(self.path):
            return ["-o", "ControlMaster=no", "-o", "ControlPath=" + self.path]
        error = self.error
        if error is not None:
            raise type(error)(error.message, error.output)
        # the first gateway's ssh made no socket (the user's own -o said no)
        return ["-o", "ControlMaster=no", "-o", "ControlPath=none"]

    def usable(self):
        """False once the master has gone (its socket with it): start another."""
        return not self.settled.is_set() or os.path.exists(self.path)

    def release(self):
        """A gateway is done with the master; the last one ends it."""
        with _ssh_lock:
            self.users -= 1
            last = self.users <= 0
            if last and self.masters.get(self.key) is self:
                del self.masters[self.key]
        if last:
            self.end()
            self.wait_gone(1.0)

    def end(self):
        """Ask the master to end now, through its socket: OpenSSH's
        multiplexing protocol (PROTOCOL.mux), each packet a 4-byte length
        and a body; after both sides' hello (type 1, version 4) a terminate
        request (type 0x10000005, request id), answered before it ends."""
        import socket

        if not os.path.exists(self.path):
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(self.path)
                sock.sendall(struct.pack("!III", 8, 1, 4) + struct.pack("!III", 8, 0x10000005, 1))
                answer = b""
                while len(answer) < 24:   # its hello, then its answer
                    data = sock.recv(64)
                    if not data:
                        break
                    answer += data
        except OSError:
            pass   # gone already, or stuck: it ends _SSH_PERSIST s after its sessions

    def wait_gone(self, timeout):
        """Wait until the master has removed its socket (it does so as it exits)."""
        import time

        deadline = time.time() + timeout
        while os.path.exists(self.path) and time.time() < deadline:
            time.sleep(0.002)


def _ssh_master(group, destination, options):
    """(the master of group for this destination, whether we are its first gateway)."""
    key = tuple(destination + options)
    directory = _ssh_control_dir()
    with _ssh_lock:
        masters = group.__dict__.setdefault("_ssh_masters", {})
        master = masters.get(key)
        first = master is None or not master.usable()
        if first:
            _ssh_state["masters"] += 1
            path = os.path.join(directory, "m%d" % _ssh_state["masters"])
            master = masters[key] = _SshMaster(masters, key, path)
        master.users += 1
    return master, first


def _close_ssh_masters(group):
    """End every ssh master of group (its gateways have ended)."""
    with _ssh_lock:
        masters = list(group.__dict__.pop("_ssh_masters", {}).values())
    for master in masters:   # all at once, then wait for them
        master.end()
    for master in masters:
        master.wait_gone(1.0)


class _SshIO(_PopenIO):
    """The local ssh client; the protocol runs on its stdin/stdout."""

    spawner_key = None     # ssh -W to a spawner: the key of its handshake
    hosts_spawner = False  # the first gateway, in whose process it runs

    def __init__(self, args, master, destination):
        _PopenIO.__init__(self, args)
        self.master = master
        self.remoteaddress = destination

    def handshake(self):
        if self.spawner_key is not None:
            self.session = _client_auth(_PipeEnd(self), self.spawner_key, _HANDSHAKE_TIMEOUT,
                                        "the spawner on %s" % self.remoteaddress)

    def close_read(self):
        _PopenIO.close_read(self)
        master, self.master = self.master, None
        if master is not None:
            if self.hosts_spawner:
                master.spawner = None   # it ends with this gateway's process
            master.release()


class _PipeEnd:
    """What the socket handshake (_client_auth) calls, on a process's pipes."""

    def __init__(self, io):
        self._io = io
        self._timeout = None

    def settimeout(self, timeout):
        self._timeout = timeout

    def recv(self, size):
        import select
        import socket

        if _WINDOWS:   # no poll() on pipes: look at what the pipe holds
            import time

            deadline = None if self._timeout is None else time.time() + self._timeout
            while _pipe_available(self._io.rfd) == 0:   # (None: its end, read b"")
                if deadline is not None and time.time() > deadline:
                    raise socket.timeout("timed out")
                time.sleep(0.005)
            return os.read(self._io.rfd, size)
        poller = select.poll()
        poller.register(self._io.rfd, select.POLLIN)
        if not poller.poll(None if self._timeout is None else self._timeout * 1000):
            raise socket.timeout("timed out")
        return os.read(self._io.rfd, size)

    def sendall(self, data):
        self._io.write(data)


def _start_spawned(spec, params, master, args, describe):
    """Start through the spawner of the master's first gateway: `ssh -W` to
    its port over the shared connection, so no session, login shell or
    interpreter search; the spawner runs `python -c _STAGE1` on the
    connection, as the socket server does.  None if there is no spawner
    for this spec or it cannot be reached (AllowTcpForwarding no, a
    python= prefix that entered another network namespace, ...): the caller
    then opens a session of its own."""
    master.spawned.wait(float(spec.bootstrap_timeout or _BOOTSTRAP_TIMEOUT))
    spawner = master.spawner
    if spawner is None or spawner[2:] != _spawner_fit(spec):
        return None
    try:
        io = _SshIO(args + ["-W", "127.0.0.1:%d" % spawner[0]], None, spec.ssh)
    except OSError:
        return None
    io.spawner_key = spawner[1]
    try:
        started = _start_io(io, spec, params, describe)
    except HostNotFound as exc:
        _trace("spawner on", spec.ssh, "not usable:", exc)
        return None
    io.master = master   # released when this gateway ends
    return started


def _spawner_fit(spec):
    """What a spawned interpreter inherits from the first gateway's process:
    specs that differ here start in sessions of their own."""
    return (spec.python if isinstance(spec.python, str) else None, sorted(spec.env.items()))


# What cmd.exe and PowerShell (Windows' OpenSSH shells) say to our POSIX
# shell command line: its first word, `export` or `for`, is not theirs
_WINDOWS_SHELL_ANSWERS = ("is not recognized as an internal or external command",
                          "was unexpected at this time",
                          "is not recognized as the name of a cmdlet",
                          "Missing opening '(' after keyword 'for'")


def _windows_shell_answered(output):
    return bool(output) and any(answer in output for answer in _WINDOWS_SHELL_ANSWERS)


def _start_ssh(spec, params, group=None):
    """Start and bootstrap a Python over ssh; returns (io, rinfo, leftover)."""
    import shlex

    if not isinstance(spec.ssh, str) or not spec.ssh.strip():
        raise ValueError(_Text.BAD_SPEC_VALUE % ("ssh", spec._spec, "a value is needed (ssh=...)"))
    destination = shlex.split(spec.ssh)
    options = _ssh_options(spec)
    command = _ssh_remote_command(spec)
    describe = "%s on ssh %s" % (spec.python if isinstance(spec.python, str) else "python3",
                                 spec.ssh)
    master, first = None, False
    share = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    spawner_key = None
    try:
        if group is not None:
            master, first = _ssh_master(group, destination, options)
            share = master.first_options() if first else master.client_options(spec)
            if first and not spec.chdir and not spec.nice:
                # (children would inherit its directory and niceness)
                import binascii
                import secrets

                spawner_key = binascii.hexlify(secrets.token_bytes(32))
                params = dict(params, spawner_key=spawner_key)
            elif not first:
                started = _start_spawned(spec, params, master,
                                         ["ssh"] + destination + options + share, describe)
                if started is not None:
                    return started
        try:
            io = _SshIO(["ssh"] + destination + options + share + [command], master, spec.ssh)
        except OSError as exc:
            raise SshError(_Text.SSH_FAILED % (spec.id, spec.ssh, None, exc))
    except BaseException as exc:
        if first:
            if isinstance(exc, SshError):
                master.error = exc
            master.settled.set()
            master.spawned.set()
        if master is not None:
            master.release()
        raise
    try:
        started = _start_io(io, spec, params, describe)
        port = started[1].pop("spawner_port", None)
        if port and spawner_key is not None:
            master.spawner = (port, spawner_key) + _spawner_fit(spec)
            io.hosts_spawner = True
        return started
    except HostNotFound as exc:
        error = exc
        if io.wait(0.0) == 255 and not isinstance(exc, SshError):
            error = _ssh_error(spec, 255, exc.output)
        elif _windows_shell_answered(exc.output):
            error = HostNotFound(_Text.SSH_TO_WINDOWS % (spec.id, spec.ssh), exc.output)
        if first and isinstance(error, SshError):
            master.error = error
        if error is exc:
            raise
        raise error from None
    finally:
        if first:
            master.settled.set()   # (after error: those waiting read it)
            master.spawned.set()


# The transports: the xspec key that selects each and its start function,
# start(spec, params, group) -> (io, rinfo, leftover).  via= comes first: it
# names the gateway in whose process the transport of the other key starts.
_TRANSPORTS = (
    ("via", _start_via),
    ("popen", _start_popen_warm),
    ("ssh", _start_ssh),
    ("socket", _start_socket),
)


def _transport_for(spec, nested=False):
    """The start function for spec (nested: in the proxy, via= is done)."""
    for key, start in _TRANSPORTS:
        if getattr(spec, key) and not (nested and key == "via"):
            return start
    known = ", ".join(key for key, start in _TRANSPORTS)
    raise ValueError(_Text.NO_TRANSPORT % (spec._spec, known))


def _write_stderr_bytes(data):
    try:
        sys.stderr.write(data.decode("utf-8", "replace"))
        sys.stderr.flush()
    except Exception:
        pass


def PopenGateway(python=None, output=None):
    """A gateway to a Python subprocess (the seed's name)."""
    spec = "popen" if python is None else "popen//python=%s" % python
    return default_group.makegateway(spec, output=output)


def SshGateway(sshaddress, remotepython=None, ssh_config=None, output=None):
    """A gateway to a Python on another host, over the system ssh (the
    seed's name): sshaddress is what you would give ssh (``user@host``,
    ``-p 2222 host``), remotepython the remote command starting Python."""
    spec = "ssh=%s" % sshaddress
    if remotepython is not None:
        spec += "//python=%s" % remotepython
    if ssh_config is not None:
        spec += "//ssh_config=%s" % ssh_config
    return default_group.makegateway(spec, output=output)


class SocketGateway:
    """A gateway to a socket server (the seed's name): SocketGateway(host,
    port) connects to a running one; the key comes from keyfile or
    $EXECNET_SINGLE_KEY."""

    def __new__(cls, host, port, keyfile=None, output=None):
        spec = "socket=%s:%d" % (host, int(port))
        if keyfile is not None:
            spec += "//keyfile=%s" % keyfile
        return default_group.makegateway(spec, output=output)

    @staticmethod
    def new_remote(gateway, hostport=None, output=None):
        """Start a socket server inside gateway's process and connect to it
        (the seed's triangle); hostport: where it listens (host, port)."""
        spec = "socket"
        if hostport is not None:
            spec += "=%s:%d" % (hostport[0] or "127.0.0.1", int(hostport[1]))
        spec += "//installvia=%s" % gateway.id
        group = gateway._group if gateway._group is not None else default_group
        return group.makegateway(spec, output=output)


# === 10. XSpec, exec models, Group, MultiChannel, RSync ===


class XSpec:
    """A gateway specification: 'key=value//key//...' (e.g. 'popen//id=w1')."""

    popen = ssh = socket = python = chdir = nice = dont_write_bytecode = None
    execmodel = via = installvia = id = window = ssh_config = vagrant_ssh = None
    bootstrap_timeout = None

    def __init__(self, string):
        self._spec = string
        self.env = {}
        for part in string.split("//"):
            key, sep, value = part.partition("=")
            if not sep:
                value = True
            if not key or key[0] == "_":
                raise AttributeError("%r not a valid XSpec key" % (key,))
            if key in self.__dict__:
                raise ValueError("duplicate key: %r in %r" % (key, string))
            if key.startswith("env:"):
                self.env[key[4:]] = value
            else:
                setattr(self, key, value)

    def __getattr__(self, name):
        if name[0] == "_":
            raise AttributeError(name)
        return None

    def __repr__(self):
        return "<XSpec %r>" % (self._spec,)

    def __str__(self):
        return self._spec

    def __hash__(self):
        return hash(self._spec)

    def __eq__(self, other):
        return self._spec == getattr(other, "_spec", None)

    def __ne__(self, other):
        return not self == other

    def _samefilesystem(self):
        return self.popen is not None and self.chdir is None


def _positive_int(value):
    if not (value.isdigit() and int(value) > 0):
        return "expected a positive integer"


def _positive_number(value):
    try:
        if float(value) > 0:
            return None
    except ValueError:
        pass
    return "expected a positive number of seconds"


def _integer(value):
    try:
        int(value)
    except ValueError:
        return "expected an integer"


def _execmodel_name(value):
    if value not in ("thread", "main_thread_only"):
        return "expected 'thread' or 'main_thread_only'"


def _module_names_list(value):
    for name in value.split(","):
        if not all(part.isidentifier() for part in name.strip().split(".")):
            return "expected module names separated by commas, not %r" % name.strip()


def _forward_names(value):
    if value.strip() == "*":
        return None
    for name in value.split(","):
        if not name.strip().isidentifier():
            return "expected top-level package names separated by commas, or *, not %r" % (
                name.strip(),)


# xspec keys whose values are checked before a gateway starts
_SPEC_CHECKS = (
    ("window", _positive_int),
    ("max_item", _positive_int),
    ("bootstrap_timeout", _positive_number),
    ("nice", _integer),
    ("execmodel", _execmodel_name),
    ("python", str.strip),
    ("ssh", str.strip),
    ("ssh_config", str.strip),
    ("chdir", str.strip),
    ("via", str.strip),
    ("installvia", str.strip),
    ("id", str.strip),
    ("keyfile", str.strip),
    ("tls_ca", str.strip),
    ("tls_cert", str.strip),
    ("tls_key", str.strip),
    ("handshake_timeout", _positive_number),
    ("preload", _module_names_list),
    ("forward", _forward_names),
)


def _check_spec(spec):
    """Raise ValueError naming the key of the first malformed value in spec."""
    for key, check in _SPEC_CHECKS:
        value = getattr(spec, key)
        if value is None or (isinstance(value, _ExecModel) and key == "execmodel"):
            continue
        if value is True or not isinstance(value, str) or not value.strip():
            problem = "a value is needed (%s=...)" % key
        elif check is str.strip:
            problem = None
        else:
            problem = check(value)
        if problem:
            raise ValueError(_Text.BAD_SPEC_VALUE % (key, spec._spec, problem))
    for key in _FLAG_KEYS:
        _flag(spec, key)
    for name, value in spec.env.items():
        if value is True:
            raise ValueError(_Text.BAD_SPEC_VALUE % ("env:" + name, spec._spec,
                                                     "a value is needed"))


class _ExecModel:
    """Threading primitives for a backend ('thread' or 'main_thread_only')."""

    def __init__(self, backend):
        self.backend = backend
        self.Lock = threading.Lock
        self.RLock = threading.RLock
        self.Event = threading.Event
        self.Condition = threading.Condition
        self.Semaphore = threading.Semaphore
        self.get_ident = threading.get_ident

    def __repr__(self):
        return "<ExecModel %r>" % (self.backend,)

    @property
    def queue(self):
        import queue

        return queue

    @property
    def subprocess(self):
        import subprocess

        return subprocess

    @property
    def socket(self):
        import socket

        return socket

    def sleep(self, delay):
        import time

        time.sleep(delay)

    def fdopen(self, fd, mode, bufsize=1, closefd=True):
        return os.fdopen(fd, mode, bufsize, closefd=closefd)

    def start(self, func, args=()):
        return _daemon(func, args)


_EXECMODELS = {}


def get_execmodel(backend):
    """The exec model object for 'thread' or 'main_thread_only'."""
    if isinstance(backend, _ExecModel):
        return backend
    if backend not in ("thread", "main_thread_only"):
        raise ValueError("unknown execmodel %r (use 'thread' or 'main_thread_only')" % (backend,))
    model = _EXECMODELS.get(backend)
    if model is None:
        model = _EXECMODELS[backend] = _ExecModel(backend)
    return model


_all_groups = []      # weak references to every Group, for the exit handler
_atexit_state = {"registered": False}


class Group:
    """A set of gateways, started together and terminated together."""

    defaultspec = "popen"

    def __init__(self, xspecs=(), execmodel="thread"):
        import weakref

        self._gateways = []
        self._autoidcounter = 0
        self._gateways_to_join = []
        self.set_execmodel(execmodel)
        _all_groups.append(weakref.ref(self))
        if xspecs:
            self.makegateways(xspecs)

    def __repr__(self):
        return "<Group %r>" % ([gw.id for gw in self],)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self._gateways[key]
        for gw in self._gateways:
            if gw == key or gw.id == key:
                return gw
        raise KeyError(key)

    def __contains__(self, key):
        try:
            self[key]
            return True
        except KeyError:
            return False

    def __len__(self):
        return len(self._gateways)

    def __iter__(self):
        return iter(list(self._gateways))

    @property
    def execmodel(self):
        return self._execmodel

    @property
    def remote_execmodel(self):
        return self._remote_execmodel

    def set_execmodel(self, execmodel, remote_execmodel=None):
        """Set the exec model for gateways made from now on."""
        if self._gateways:
            raise ValueError("can not set execution models if gateways have been created already")
        self._execmodel = get_execmodel(execmodel)
        self._remote_execmodel = get_execmodel(remote_execmodel or execmodel)

    def allocate_id(self, spec, taken=()):
        """Give spec an id ('gw0', 'gw1', ...) unless it has one.

        taken: ids of gateways about to start with it (makegateways).
        """
        if spec.id is None:
            while True:
                id = "gw" + str(self._autoidcounter)
                self._autoidcounter += 1
                if id not in self and id not in taken:
                    break
            spec.id = id
        elif spec.id in self or spec.id in taken:
            raise ValueError("duplicate gateway id %r" % (spec.id,))

    def makegateway(self, spec=None, output=None):
        """Start a gateway for spec (string or XSpec) and add it to the group."""
        spec = self._prepare(spec)
        gateway = self._start(spec, output)
        self._register(gateway)
        return gateway

    def makegateways(self, specs, output=None):
        """Start several gateways concurrently; return them in order."""
        prepared = []
        for spec in specs:
            prepared.append(self._prepare(spec, {s.id for s in prepared}))
        specs = prepared
        results = [None] * len(specs)

        def start(index):
            try:
                results[index] = self._start(specs[index], output)
            except BaseException as exc:
                results[index] = exc

        # gateways started via= others in this batch must wait for them
        ids = {spec.id for spec in specs}
        direct = [i for i, spec in enumerate(specs)
                  if spec.via not in ids and spec.installvia not in ids]
        threads = []
        for i in direct[1:]:
            threads.append(_daemon(start, (i,), "execnet_single-start"))
        if direct:
            start(direct[0])
        for thread in threads:
            thread.join()
        for i in direct:
            if isinstance(results[i], Gateway):
                self._register(results[i])
        for i, spec in enumerate(specs):
            if i not in direct:
                start(i)
                if isinstance(results[i], Gateway):
                    self._register(results[i])
        errors = [r for r in results if not isinstance(r, Gateway)]
        if errors:
            for gateway in results:
                if isinstance(gateway, Gateway):
                    gateway.exit()
            raise errors[0]
        return results

    def _prepare(self, spec, taken=()):
        if spec is None or spec == "":  # as execnet: the default, a popen gateway
            spec = self.defaultspec
        if not isinstance(spec, XSpec):
            spec = XSpec(spec)
        _check_spec(spec)
        self.allocate_id(spec, taken)
        if spec.execmodel is None:
            spec.execmodel = self.remote_execmodel.backend
        get_execmodel(spec.execmodel)
        return spec

    def _start(self, spec, output):
        _setup_trace()
        _register_atexit()
        params = _gateway_params(spec, _module_names())
        io, rinfo, leftover = _transport_for(spec)(spec, params, self)
        gateway = Gateway(io, spec, rinfo, output, leftover)
        if params.get("forward"):
            _ForwardServer(gateway, params["forward"], params["forward_preload"])
        _trace("started gateway", spec.id, rinfo)
        return gateway

    def _register(self, gateway):
        gateway._group = self
        self._gateways.append(gateway)

    def _unregister(self, gateway):
        if gateway in self._gateways:
            self._gateways.remove(gateway)
        self._gateways_to_join.append(gateway)

    def remote_exec(self, source, **kwargs):
        """remote_exec on every gateway; returns a MultiChannel."""
        return MultiChannel([gw.remote_exec(source, **kwargs) for gw in self])

    def terminate(self, timeout=None):
        """Exit every gateway (proxies last); kill what is left after timeout.

        Returns within about twice (timeout + 1) seconds, whatever else runs.
        """
        import time

        gateways = list(self._gateways) + self._gateways_to_join
        self._gateways[:] = []
        self._gateways_to_join = []
        proxies = {gw.spec.via or gw.spec.installvia for gw in gateways
                   if gw.spec.via or gw.spec.installvia}
        limit = _EXIT_TIMEOUT if timeout is None else timeout
        # Running code may finish for all but the last second of the timeout
        # (pytest-xdist gives 10 s, while its workers still unconfigure);
        # only then does a busy remote show its stacks and leave.
        grace = limit - 1.0 if limit - 1.0 > _EXIT_GRACE else None
        # those that others run through go last
        for batch in ([gw for gw in gateways if gw.id not in proxies],
                      [gw for gw in gateways if gw.id in proxies]):
            for gw in batch:
                gw._request_exit(grace)
            deadline = time.time() + limit
            for gw in batch:
                gw._await_exit(deadline)
            for gw in batch:
                gw._kill_if_alive()
            deadline = time.time() + 1.0
            for gw in batch:
                gw._finish_exit(deadline)
        _close_fork_servers(self)
        _close_ssh_masters(self)

    def _cleanup_atexit(self):
        self.terminate(timeout=_EXIT_TIMEOUT)


def _module_names():
    """Names other than 'execnet_single' this module is imported under."""
    me = sys.modules.get(__name__)
    names = [name for name, mod in list(sys.modules.items())
             if mod is me and name not in ("execnet_single", "__main__") and "." not in name]
    if __name__ != "execnet_single" and "." not in __name__ and __name__ != "__main__":
        names.append(__name__)
    return sorted(set(names))


def _register_atexit():
    if not _atexit_state["registered"]:
        import atexit

        _atexit_state["registered"] = True
        atexit.register(_terminate_all_groups, os.getpid())


def _terminate_all_groups(pid):
    """At interpreter exit: end every gateway quickly and silently."""
    if os.getpid() != pid:
        return  # a fork of the process that owns the gateways
    for ref in list(_all_groups):
        group = ref()
        if group is not None:
            try:
                group._cleanup_atexit()
            except Exception:
                pass
    _remove_ssh_control_dir()


class MultiChannel:
    """Several channels used together (from Group.remote_exec)."""

    def __init__(self, channels):
        self._channels = channels

    def __len__(self):
        return len(self._channels)

    def __iter__(self):
        return iter(self._channels)

    def __getitem__(self, key):
        return self._channels[key]

    def __contains__(self, chan):
        return chan in self._channels

    def send_each(self, item):
        """Send item on every channel."""
        for channel in self._channels:
            channel.send(item)

    def receive_each(self, withchannel=False):
        """Receive one item from each channel, in order."""
        if withchannel:
            return [(ch, ch.receive()) for ch in self._channels]
        return [ch.receive() for ch in self._channels]

    def make_receive_queue(self, endmarker=_NO_ENDMARKER_WANTED):
        """A queue of (channel, item) for items arriving on any channel."""
        try:
            return self._queue
        except AttributeError:
            import queue

            self._queue = queue.Queue()
            for channel in self._channels:
                def putreceived(obj, channel=channel):
                    self._queue.put((channel, obj))

                if endmarker is _NO_ENDMARKER_WANTED:
                    channel.setcallback(putreceived)
                else:
                    channel.setcallback(putreceived, endmarker=endmarker)
            return self._queue

    def waitclose(self):
        """Wait for all channels to close; raise the first remote error."""
        first = None
        for channel in self._channels:
            try:
                channel.waitclose()
            except ExecnetError as exc:
                if first is None:
                    first = exc
        if first is not None:
            raise first


default_group = Group()
makegateway = default_group.makegateway


def set_execmodel(execmodel, remote_execmodel=None):
    """Set the exec model of the default group."""
    default_group.set_execmodel(execmodel, remote_execmodel)


class RSync:
    """Copy a directory tree to one or more gateways' hosts (only changes).

    Files are compared by size and modification time; new or changed files
    are sent, modes and symlinks are copied, and with delete=True files the
    source does not have are removed from the target.  An absolute symlink
    to a path inside the source tree points to the same path inside the
    target; other symlinks are copied as they are.
    """

    # Conversation with _rsync_receive, per target (one channel each):
    #   local -> remote  (destdir, delete, entries); an entry is
    #                    (relpath, kind, mode, size, mtime_ns, linktarget),
    #                    kind "d" dir, "f" file, "l" symlink copied as is,
    #                    "L" symlink to linktarget, a relpath in the tree
    #   remote -> local  [relpath, ...]: the files it needs
    #   local -> remote  the bytes of each of those files, in that order
    #   remote -> local  per file written, its size (the "ack")
    #   remote -> local  "done" once deletions are finished too
    _REMOTE = "import execnet_single\nexecnet_single._rsync_receive(channel)"
    _LOST = "rsync to gateway %s: the channel closed before the copy was complete"

    def __init__(self, sourcedir, callback=None, verbose=True):
        self._sourcedir = str(sourcedir)
        self._verbose = verbose
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        self._callback = callback
        self._targets = []

    def filter(self, path):
        """Override to leave out paths: return False to skip path."""
        return True

    def add_target(self, gateway, destdir, finishedcallback=None, **options):
        """Add a target: destdir on gateway's host (options: delete=True)."""
        unknown = set(options) - {"delete"}
        if unknown:
            raise TypeError("unknown rsync options: %s" % ", ".join(sorted(unknown)))
        self._targets.append((gateway, str(destdir), finishedcallback, bool(options.get("delete"))))

    def _report_send_file(self, gateway, modified_rel_path):
        if self._verbose:
            print("%s <= %s" % (gateway, modified_rel_path))

    def _listing(self):
        """(relpath, kind, mode, size, mtime in ns, linktarget) for the whole tree."""
        root = os.path.normpath(self._sourcedir)
        # a link may name the tree through a symlinked parent: accept both
        bases = [os.path.abspath(root), os.path.realpath(root)]
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                path = os.path.join(dirpath, name)
                if not self.filter(path):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                try:
                    st = os.lstat(path)
                    link = os.readlink(path) if os.path.islink(path) else None
                except FileNotFoundError:  # gone since os.walk listed it
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                if link is not None:
                    entries.append(self._link_entry(rel, link, bases))
                    if name in dirnames:
                        dirnames.remove(name)  # do not follow
                elif name in dirnames:
                    entries.append((rel, "d", st.st_mode & 0o7777, 0, 0, None))
                else:
                    entries.append((rel, "f", st.st_mode & 0o7777, st.st_size,
                                    st.st_mtime_ns, None))
        return root, entries

    @staticmethod
    def _link_entry(rel, target, bases):
        if os.path.isabs(target):
            for base in bases:
                inside = os.path.relpath(target, base)
                # the root itself is not "inside" (as in execnet)
                if inside not in (os.curdir, os.pardir) and not inside.startswith(
                        os.pardir + os.sep):
                    return (rel, "L", 0, 0, 0, inside.replace(os.sep, "/"))
        return (rel, "l", 0, 0, 0, target)

    def send(self, raises=True):
        """Bring every target up to date with the source directory."""
        import queue

        if not self._targets:
            if raises:
                raise OSError("no targets available, maybe you are trying call send() twice?")
            return
        root, entries = self._listing()
        sizes = dict((entry[0], entry[3]) for entry in entries if entry[1] == "f")
        targets, self._targets = self._targets, []
        # Every target is served by its own thread, so a slow host does not
        # hold up the others; callbacks all run here, in the caller's thread.
        events = queue.Queue()
        end = object()
        jobs = []
        for gateway, destdir, finished, delete in targets:
            job = {"gateway": gateway, "finished": finished, "inbox": queue.Queue(),
                   "channel": None, "thread": None, "done": False, "error": None,
                   "failure": None}
            jobs.append(job)
            try:
                channel = gateway.remote_exec(self._REMOTE)
                channel.setcallback(lambda item, job=job: events.put((job, item)), endmarker=end)
            except Exception as exc:  # e.g. the gateway has gone away
                job["error"] = exc
                continue
            job["channel"] = channel
            job["thread"] = threading.Thread(
                target=self._serve_target, args=(job, (destdir, delete, entries), root, events),
                name="execnet_single-rsync-%s" % (gateway.id,))
            job["thread"].daemon = True
            job["thread"].start()
        running = sum(1 for job in jobs if job["channel"] is not None)
        try:
            while running:
                job, item = events.get()
                if item is end:
                    running -= 1
                    self._target_ended(job)
                elif isinstance(item, tuple):  # from the job's thread
                    what, value = item
                    if what == "report":
                        self._report_send_file(job["gateway"], value)
                    else:
                        job["failure"] = value
                elif isinstance(item, list):
                    if self._callback:
                        self._callback("list", sum(sizes.get(rel, 0) for rel in item),
                                       job["channel"])
                    job["inbox"].put(item)
                elif isinstance(item, int):
                    if self._callback:
                        self._callback("ack", item, job["channel"])
                else:
                    job["done"] = True
        except BaseException:
            # a callback failed or the caller was interrupted: end every
            # remote side too, rather than leave it waiting for files
            for job in jobs:
                if job["channel"] is not None:
                    try:
                        job["channel"].close("rsync aborted")
                    except Exception:
                        pass
            raise
        finally:
            for job in jobs:
                job["inbox"].put(None)  # no thread waits forever for its list
        for job in jobs:
            if job["thread"] is not None:
                job["thread"].join()
        for job in jobs:
            if job["error"] is not None:
                raise job["error"]

    def _serve_target(self, job, request, root, events):
        """One target's thread: send the listing, then the files it asks for."""
        channel = job["channel"]
        try:
            channel.send(request)
            wanted = job["inbox"].get()
            for rel in wanted or ():
                try:
                    with open(os.path.join(root, *rel.split("/")), "rb") as f:
                        data = f.read()
                except FileNotFoundError:  # gone since the listing: skip it
                    channel.send(None)
                    continue
                events.put((job, ("report", rel)))
                channel.send(data)
        except Exception as exc:
            events.put((job, ("error", exc)))
            try:
                channel.close(str(exc))  # else the remote side waits for the file
            except Exception:
                pass

    def _target_ended(self, job):
        """The target's channel closed: record why, or report it finished."""
        try:
            job["channel"].waitclose(0)
        except Exception as exc:
            # the remote side's error explains a local send that failed on it
            job["error"] = exc
        if job["error"] is None and not job["done"]:
            job["error"] = job["failure"] or OSError(self._LOST % (job["gateway"].id,))
        job["inbox"].put(None)
        if job["error"] is None and job["finished"] is not None:
            job["finished"]()


def _rsync_receive(channel):
    """Remote side of RSync: update destdir from the listing (see RSync)."""
    import shutil

    destdir, delete, entries = channel.receive()
    if not os.path.isdir(destdir):
        os.makedirs(destdir)
    absdest = os.path.abspath(destdir)
    wanted = []
    for rel, kind, mode, size, mtime, target in entries:
        path = os.path.join(destdir, *rel.split("/"))
        if kind == "d":
            if os.path.islink(path) or os.path.isfile(path):
                os.remove(path)
            if not os.path.isdir(path):
                os.makedirs(path)
            os.chmod(path, mode)
        elif kind in ("l", "L"):
            if os.path.islink(path) or os.path.isfile(path):
                os.remove(path)
            elif os.path.isdir(path):
                shutil.rmtree(path)
            if kind == "L":
                target = os.path.join(absdest, *target.split("/"))
            os.symlink(target, path)
        else:
            try:
                st = os.lstat(path)
                same = os.path.isfile(path) and st.st_size == size and st.st_mtime_ns == mtime
            except OSError:
                same = False
            if same:
                os.chmod(path, mode)
            else:
                wanted.append(rel)
    channel.send(wanted)
    bykey = {entry[0]: entry for entry in entries}
    for rel in wanted:
        data = channel.receive()
        if data is None:  # the file went away on the sending side
            bykey.pop(rel)
            channel.send(0)
            continue
        path = os.path.join(destdir, *rel.split("/"))
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        with open(path, "wb") as f:
            f.write(data)
        entry = bykey[rel]
        os.chmod(path, entry[2])
        os.utime(path, ns=(entry[4], entry[4]))
        channel.send(len(data))
    if delete:
        keep = set(bykey)
        for dirpath, dirnames, filenames in os.walk(destdir, topdown=False):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, destdir).replace(os.sep, "/")
                if rel not in keep:
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
    channel.send("done")


# === 11. Remote calls ===
#
# gw.call(func, *args, **kwargs) runs func in the remote through the
# gateway's call server: one remote_exec of _serve_calls, started on the
# first call, whose channel carries every call.  Items on it:
#
#   to the remote    (call_id, target, args, kwargs)    a call; kwargs None:
#                                                       none; 0: args is a
#                                                       list of argument
#                                                       tuples (a chunk of
#                                                       Executor.map)
#                    ("cancel", call_id)                skip it if not started
#                    ("limit", n)                       run at most n at once
#   from the remote  (call_id, status, value)           _DONE: the result;
#                    _FAILED: (traceback text, _error_kind); _BAD_RESULT: the
#                    DumpError text; _DONE_BYTES: the result is the next
#                    item, large bytes (sent without a copy); _SKIPPED and
#                    _STARTED: the answer to "cancel"
#
# target is an int naming a function defined by an earlier call, or on its
# first use (tid, module, qualname, source, filename): by source if the
# function is self-contained (it needs nothing remotely), else by reference
# through _resolve_reference, the one place an import-forwarding feature
# needs to hook into.  The local side completes futures in the channel's
# callback (the receiver thread): no thread of its own, no per-message cost
# for other channels.  With the main_thread_only exec model the server runs
# in the remote main thread and calls run there one at a time; while it
# lives, other remote_exec calls on that gateway are refused.

_CALL_LIMIT = 8   # calls one gateway runs at once, unless set_call_limit says
_DONE, _FAILED, _BAD_RESULT, _DONE_BYTES, _SKIPPED, _STARTED = range(6)
_CALL_TARGETS = {}   # func -> (module, qualname, source, filename), checked once
_CALL_END = object()  # the call channel's endmarker
_calls_lock = threading.Lock()


def _call_source(function):
    """(filename, source) of a self-contained function, or raise ValueError."""
    import inspect
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as exc:
        raise ValueError("no source: %s" % (exc,)) from None
    used = _non_builtin_globals(source, function.__code__)
    if used:
        raise ValueError("it uses the globals %s" % (", ".join(used),))
    filename = inspect.getsourcefile(function) or "<remote call>"
    return filename, "\n" * (function.__code__.co_firstlineno - 1) + source


def _local_reference(module, qualname):
    """The object module.qualname in this process, or None."""
    obj = sys.modules.get(module)
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    return obj


def _call_target(func):
    """How func travels: (module, qualname, source, filename); raises
    TypeError/ValueError for what the remote cannot find (nothing is sent)."""
    try:
        target = _CALL_TARGETS.get(func)
    except TypeError:   # 3.6: a method bound to an unhashable object ([].append)
        target = None
    if target is not None:
        return target
    name = getattr(func, "__qualname__", None) or repr(func)
    # (PyPy: builtins such as str.upper are functions too, of builtin code)
    if isinstance(func, type(_call_target)) and isinstance(
            getattr(func, "__code__", None), type(_call_target.__code__)):
        if func.__name__ == "<lambda>":
            raise ValueError(_Text.CALL_LAMBDA % (name,))
        if func.__closure__:
            raise ValueError(_Text.CALL_CLOSURE % (name,))
        if "<locals>" in name:
            raise ValueError(_Text.CALL_NESTED % (name,))
        module = func.__module__
        try:
            filename, source = _call_source(func)
            target = (None, func.__name__, source, filename)
        except ValueError as exc:
            if module in (None, "__main__", "__channelexec__") or _local_reference(
                    module, name) is not func:
                raise ValueError(_Text.CALL_NOT_SELF_CONTAINED % (name, module, exc)) from None
            target = (module, name, None, None)
    else:
        owner = getattr(func, "__self__", None)
        if owner is not None and not isinstance(owner, (type, type(sys))):
            raise TypeError(_Text.CALL_BOUND % (func,))
        module = getattr(owner if isinstance(owner, type) else func, "__module__", None)
        if module is None:
            module = getattr(getattr(func, "__objclass__", None), "__module__", None)
        if module is None and _local_reference("builtins", name) is func:
            module = "builtins"   # PyPy: str.upper names neither module nor class
        if not (isinstance(module, str) and isinstance(name, str)
                and _local_reference(module, name) == func):
            raise TypeError(_Text.CALL_NOT_FUNCTION % (func,))
        target = (module, name, None, None)
    try:
        _CALL_TARGETS[func] = target
    except TypeError:  # unhashable: checked again next time
        pass
    return target


def _resolve_reference(module, qualname):
    """The object module.qualname in this (remote) process, importing module."""
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _dump_failure(obj, root):
    """The DumpError text for obj, its path starting at root (None: it dumps)."""
    try:
        dumps(obj)
    except DumpError:
        pass
    else:
        return None
    try:
        _save(obj, [].append, 1)
    except _DumpFail as fail:
        return "%s at %s%s" % (fail.reason, root, "".join(reversed(fail.path)))
    except RecursionError:
        pass
    return "can't serialize a recursive or too deeply nested structure at %s" % (root,)


# -- the remote side --


def _serve_calls(channel, limit):
    """Remote: serve calls arriving on channel until it closes."""
    server = _CallServer(channel, limit)
    channel.setcallback(server.on_item, endmarker=None)
    server.work()
    server.finished.wait()


class _CallTarget:
    """A remote call target, resolved on its first call."""

    def __init__(self, definition):
        self.definition = definition
        self.func = None
        self.lock = threading.Lock()

    def get(self):
        func = self.func
        if func is None:
            with self.lock:
                if self.func is None:
                    module, qualname, source, filename = self.definition
                    if source is None:
                        self.func = _resolve_reference(module, qualname)
                    else:
                        _remember_source(filename, source)
                        namespace = {"__name__": "__channelexec__"}
                        exec(compile(source, filename, "exec"), namespace)
                        self.func = namespace[qualname]
                func = self.func
        return func


class _CallServer:
    """Remote: queues calls as they arrive (receiver thread) and runs them
    in up to `limit` worker threads, started as needed."""

    def __init__(self, channel, limit):
        self.channel = channel
        self.single = channel.gateway.execmodel.backend == "main_thread_only"
        self.limit = 1 if self.single else max(1, limit)
        self.lock = threading.Lock()
        self.slots = threading.Condition(self.lock)  # (after a lower limit)
        self.sendlock = threading.Lock()  # a large bytes result goes in two items
        self.queue = _Queue()
        self.targets = {}
        self.waiting = set()   # ids of calls queued, not started
        self.workers = 1       # the thread of _serve_calls is one
        self.idle = 0          # workers waiting, not yet promised a call
        self.backlog = 0       # calls queued that no worker was promised
        self.running = 0
        self.held = 0          # workers waiting for a slot
        self.finished = threading.Event()

    def on_item(self, item):
        if item is None:
            self.queue.put(None)
            return
        first = item[0]
        if type(first) is int:
            target = item[1]
            if type(target) is tuple:
                self.targets[target[0]] = _CallTarget(target[1:])
            with self.lock:
                self.waiting.add(first)
                if self.idle:
                    self.idle -= 1
                    start = False
                else:
                    self.backlog += 1
                    start = self.workers < self.limit
                    if start:
                        self.workers += 1
            self.queue.put(item)
            if start:
                _daemon(self.work, (), "execnet_single-call")
        elif first == "cancel":
            with self.lock:
                waiting = item[1] in self.waiting
                self.waiting.discard(item[1])
            answer = (item[1], _SKIPPED if waiting else _STARTED, None)
            # the receiver thread must not wait for a worker's send: it
            # may wait for credit that this thread brings
            _daemon(self.reply, (answer,), "execnet_single-call-answer")
        elif first == "limit" and not self.single:
            with self.lock:
                self.limit = max(1, item[1])
                self.slots.notify_all()
                more = max(0, min(self.backlog, self.limit - self.workers))
                self.workers += more
            for _ in range(more):
                _daemon(self.work, (), "execnet_single-call")

    def work(self):
        lock = self.lock
        get = self.queue.get
        waiting = self.waiting
        ran = False
        try:
            while True:
                with lock:
                    if ran:
                        self.running -= 1
                        if self.held:
                            self.slots.notify()
                    if self.backlog:
                        self.backlog -= 1
                    else:
                        self.idle += 1
                item = get()
                if item is None:
                    self.queue.put(None)  # for the other workers
                    return
                call_id = item[0]
                with lock:
                    while self.running >= self.limit:
                        self.held += 1
                        self.slots.wait()
                        self.held -= 1
                    ran = call_id in waiting
                    if ran:   # (else cancelled)
                        waiting.discard(call_id)
                        self.running += 1
                if ran:
                    self.call(*item)
        finally:
            with lock:
                self.workers -= 1
                if not self.workers:
                    self.finished.set()

    def call(self, call_id, target, args, kwargs):
        value = None
        try:
            func = self.targets[target if type(target) is int else target[0]].get()
            if kwargs is None:
                value = func(*args)
            elif type(kwargs) is int:  # a chunk: a list of argument tuples
                value = [func(*one) for one in args]
            else:
                value = func(*args, **kwargs)
            reply = (call_id, _DONE, value)
        except BaseException as exc:  # SystemExit too: the server carries on
            reply = (call_id, _FAILED, (_format_error(exc), _error_kind(exc)))
        _flush_std_streams()
        self.reply(reply, value)

    def reply(self, reply, value=None):
        """Send a reply (the send lock keeps a _DONE_BYTES pair together)."""
        send = self.channel.send
        call_id = reply[0]
        try:
            with self.sendlock:
                if type(value) is bytes and len(value) > _READ_SIZE:
                    # the bytes as an item of their own: sent without a copy
                    send((call_id, _DONE_BYTES, None))
                    send(value)
                    return
                try:
                    send(reply)
                except DumpError as exc:
                    send((call_id, _BAD_RESULT, _dump_failure(value, "result") or str(exc)))
        except OSError:
            pass  # the local side is gone


# -- the local side --


def _future_base():
    """concurrent.futures, imported on first use (not at remote start)."""
    import concurrent.futures

    return concurrent.futures


class _CallFutureMixin:
    """A Future of a remote call: cancel() asks the remote for one it sent."""

    _client = None
    _call_id = None    # set once the call is sent
    _call_name = None
    _answer = None

    def cancel(self):
        """Cancel the call unless it has started; True if it never runs."""
        with self._sendlock:
            client = self._client
            if client is None or self._call_id is None or self.done():
                return self._future_cancel()
            return client._cancel(self)

    def _future_cancel(self):
        return super().cancel()


class _CallWaiter:
    """What gw.call waits on: the few Future methods _CallClient uses."""

    _answer = _client = _call_id = _call_name = None

    def __init__(self):
        self.queue = _Queue()

    def done(self):
        return False

    def set_result(self, value):
        self.queue.put((True, value))

    def set_exception(self, exc):
        self.queue.put((False, exc))


_made_classes = {}


def _made_class(name, mixin, base):
    """The class (mixin, base), made once (base is imported late)."""
    cls = _made_classes.get(mixin)
    if cls is None:
        cls = _made_classes[mixin] = type(name, (mixin, base), {"__module__": __name__})
    return cls


def _new_future():
    cls = _made_class("CallFuture", _CallFutureMixin, _future_base().Future)
    future = cls()
    future._sendlock = threading.Lock()
    return future


class _CallClient:
    """The local end of one gateway's call server."""

    def __init__(self, gateway):
        self.gateway = gateway
        # reentrant: setcallback() calls _ended at once, under it, if the
        # call server's channel closed before its callback was set
        self.lock = threading.RLock()
        self.channel = None
        self.futures = {}      # call_id -> future, while running
        self.bytes_for = None  # the call whose bytes result is the next item
        self.next_id = 1
        self.tids = {}         # target tuple -> [tid, sent]
        self.limit = _CALL_LIMIT

    def set_limit(self, limit):
        limit = int(limit)
        if limit < 1:
            raise ValueError("the call limit must be at least 1, not %r" % (limit,))
        with self.lock:
            self.limit = limit
            channel = self.channel
        if channel is not None:
            channel.send(("limit", limit))

    def _channel(self):
        """The call server's channel (lock held), started on first use."""
        channel = self.channel
        if channel is None:
            channel = self.gateway.remote_exec(
                "import execnet_single\nexecnet_single._serve_calls(channel, %d)" % self.limit)
            channel.setcallback(lambda item: self._on_reply(channel, item), endmarker=_CALL_END)
            self.channel = channel
        return channel

    def submit(self, func, args, kwargs, future=None, chunk=False):
        """Send a call; its future completes when the result arrives."""
        target = _call_target(func)
        if future is None:
            future = _new_future()
        with future._sendlock:
            if not future.cancelled():
                self._send(future, target, args, kwargs, chunk)
        return future

    def call(self, func, args, kwargs):
        """Run a call and wait for its result (no Future: the fast path)."""
        waiter = _CallWaiter()
        self._send(waiter, _call_target(func), args, kwargs, False)
        ok, value = waiter.queue.get()
        if ok:
            return value
        raise value

    def _send(self, future, target, args, kwargs, chunk):
        with self.lock:
            channel = self._channel()
            call_id = self.next_id
            self.next_id += 1
            entry = self.tids.get(target)
            if entry is None:
                entry = self.tids[target] = [len(self.tids), False]
            self.futures[call_id] = future
        tid, sent = entry
        request = (call_id, tid if sent else (tid,) + target, args,
                   0 if chunk else (kwargs or None))
        future._client = self
        future._call_id = call_id
        future._call_name = target[1]
        try:
            channel.send(request)
        except BaseException as exc:
            with self.lock:
                self.futures.pop(call_id, None)
            future._call_id = None
            if isinstance(exc, DumpError):
                text = (_dump_failure(args, "args") or _dump_failure(kwargs, "kwargs")
                        or str(exc))
                raise DumpError(_Text.CALL_BAD_ARG % (target[1], self.gateway.id, text)
                                ) from None
            raise
        entry[1] = True

    def _cancel(self, future):
        """Ask the remote to skip a sent call (future's send lock held)."""
        if threading.get_ident() == self.gateway._receiver_ident:
            return False  # the answer would arrive in this very thread
        future._answer = answer = threading.Event()
        try:
            self.channel.send(("cancel", future._call_id))
        except OSError:
            return False
        answer.wait()
        if future._answer is _SKIPPED:
            with self.lock:
                self.futures.pop(future._call_id, None)
            return future._future_cancel()
        return False

    def _on_reply(self, channel, item):
        """The call channel's callback (receiver thread)."""
        if self.bytes_for is not None:
            call_id, status, value = self.bytes_for, _DONE, item
            self.bytes_for = None
        elif item is _CALL_END:
            self._ended(channel)
            return
        else:
            call_id, status, value = item
            if status == _DONE_BYTES:
                self.bytes_for = call_id
                return
        if status >= _SKIPPED:
            future = self.futures.get(call_id)
            if future is not None:
                event = future._answer
                future._answer = status
                if status == _STARTED and not future.done():
                    future.set_running_or_notify_cancel()
                if event is not None and event is not status:
                    event.set()
            return
        future = self.futures.pop(call_id, None)
        if future is None or future.done():
            return
        if status == _DONE:
            future.set_result(value)
        elif status == _FAILED:
            future.set_exception(_remote_error(*value))
        else:
            future.set_exception(DumpError(_Text.CALL_BAD_RESULT % (
                future._call_name, self.gateway.id, value)))

    def _ended(self, channel):
        """The call server or the gateway ended: fail what is still running."""
        with self.lock:
            if self.channel is channel:
                self.channel = None
            futures, self.futures = self.futures, {}
            self.bytes_for = None
            for entry in self.tids.values():
                entry[1] = False  # a new server knows no targets
        error = channel._getremoteerror()
        for call_id, future in futures.items():
            event = future._answer
            if isinstance(event, threading.Event):
                future._answer = _STARTED
                event.set()
            if future.done():
                continue
            if isinstance(error, RemoteError) and not isinstance(error, GatewayDied):
                exc = error   # the call server itself failed
            else:   # the gateway ended (a GatewayDied says why): the call is lost
                exc = EOFError(_Text.CALL_LOST % (self.gateway.id, future._call_name,
                                                  error or _Text.CALL_LOST_EXIT))
            try:
                future.set_exception(exc)
            except Exception:  # set meanwhile (3.8+: InvalidStateError)
                pass


def _call_client(gateway):
    client = gateway.__dict__.get("_calls")
    if client is None:
        with _calls_lock:
            client = gateway.__dict__.get("_calls")
            if client is None:
                client = gateway._calls = _CallClient(gateway)
    return client


class Executor:
    """A concurrent.futures.Executor running calls on a group's gateways."""

    def __new__(cls, *args, **kwargs):
        # a real concurrent.futures.Executor, whose module is imported now
        # rather than at every remote start
        if not issubclass(cls, _future_base().Executor):
            cls = _made_class(cls.__name__, cls, _future_base().Executor)
        return object.__new__(cls)

    def __init__(self, specs_or_group, per_gateway=1):
        if per_gateway < 1:
            raise ValueError("per_gateway must be at least 1, not %r" % (per_gateway,))
        from _collections import deque

        if isinstance(specs_or_group, Group):
            self.group, self._own_group = specs_or_group, False
        else:
            if isinstance(specs_or_group, (str, XSpec)):
                specs_or_group = [specs_or_group]
            self.group, self._own_group = Group(specs_or_group), True
        self.per_gateway = per_gateway
        self._lock = threading.Lock()
        self._queue = deque()     # (future, func, args, kwargs, chunk) not yet sent
        self._busy = {}           # gateway -> calls sent and not finished
        self._dead = {}           # gateway -> why it cannot take calls
        self._pending = set()     # every future not yet done
        self._idle = threading.Condition(self._lock)
        self._shutdown = False
        self._turn = 0            # where _free_gateway's round-robin starts
        for gateway in self.group:
            client = _call_client(gateway)
            if client.limit != per_gateway:
                client.set_limit(per_gateway)

    def submit(self, fn, *args, **kwargs):
        """Schedule fn(*args, **kwargs) on a gateway; return its Future."""
        return self._submit(fn, args, kwargs, False)

    def _submit(self, fn, args, kwargs, chunk):
        target = _call_target(fn)  # refused now, not in a future
        future = _new_future()
        future._gateway = None   # the gateway it runs on, once sent
        with self._lock:
            if self._shutdown:
                raise RuntimeError(_Text.CALL_SHUTDOWN)
            self._queue.append((future, target, args, kwargs, chunk))
            self._pending.add(future)
        future.add_done_callback(self._settled)
        self._pump()
        return future

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like map(), its results in order; chunksize calls travel as one."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if chunksize == 1:
            return _future_base().Executor.map(self, fn, *iterables, timeout=timeout)
        import itertools
        import time

        items = zip(*iterables)
        futures = []
        while True:
            chunk = list(itertools.islice(items, chunksize))
            if not chunk:
                break
            futures.append(self._submit(fn, chunk, None, True))
        end = None if timeout is None else time.monotonic() + timeout

        def results():
            try:
                futures.reverse()
                while futures:
                    left = None if end is None else end - time.monotonic()
                    for value in futures.pop().result(left):
                        yield value
            finally:
                for future in futures:
                    future.cancel()
        return results()

    def shutdown(self, wait=True, cancel_futures=False):
        """No new calls; cancel queued ones if asked; wait; end own gateways."""
        with self._lock:
            self._shutdown = True
            dropped = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
        for entry in dropped:
            entry[0].cancel()
        if wait:
            with self._idle:
                self._idle.wait_for(lambda: not self._pending)
            if self._own_group:
                self.group.terminate()
        elif self._own_group:
            _daemon(self.shutdown, (True,), "execnet_single-executor-shutdown")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown(wait=True)
        return False

    def _settled(self, future):
        """A future is done (receiver thread, or where it was cancelled)."""
        gateway = future._gateway
        # (the exception is read directly: exception() would take its lock again)
        if gateway is not None and isinstance(future._exception, EOFError):
            with self._lock:
                self._dead.setdefault(gateway, future._exception)
        with self._lock:
            self._pending.discard(future)
            if not self._pending:
                self._idle.notify_all()
            if gateway is not None:
                self._release(gateway)
        if self._queue:
            self._pump()

    def _release(self, gateway):
        """One call fewer on gateway (lock held)."""
        busy = self._busy[gateway] - 1
        if busy:
            self._busy[gateway] = busy
        else:
            del self._busy[gateway]

    def _pump(self):
        """Send queued calls to gateways with room (any thread)."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                gateway, live = self._free_gateway()
                if gateway is None:
                    if self._busy or live:
                        return
                    entries = list(self._queue)
                    self._queue.clear()
                    reason = "; ".join("%s: %s" % (gw.id, why) for gw, why in self._dead.items())
                else:
                    entries = None
                    entry = self._queue.popleft()
                    self._busy[gateway] = self._busy.get(gateway, 0) + 1
            if entries is not None:  # (outside the lock: done callbacks take it)
                for entry in entries:
                    _fail(entry[0], EOFError(_Text.CALL_NO_GATEWAY % (entry[1][1], reason)))
                return
            future, target, args, kwargs, chunk = entry
            error = None
            with future._sendlock:   # cancel() waits, or has happened
                if not future.cancelled():
                    future._gateway = gateway
                    try:
                        _call_client(gateway)._send(future, target, args, kwargs, chunk)
                        continue
                    except DumpError as exc:
                        error = exc
                    except (OSError, EOFError, RemoteError) as exc:
                        error = exc
                        with self._lock:
                            self._dead[gateway] = exc
                            self._queue.appendleft(entry)
                    future._gateway = None
            with self._lock:
                self._release(gateway)
            if isinstance(error, DumpError):
                _fail(future, error)

    def _free_gateway(self):
        """(the least busy gateway with room or None, whether any lives).

        Ties go round-robin, starting after the last one chosen: calls that
        finish before the next is sent still spread over the gateways."""
        best = None
        live = False
        gateways = list(self.group._gateways)
        start = self._turn % len(gateways) if gateways else 0
        for position in list(range(start, len(gateways))) + list(range(start)):
            gateway = gateways[position]
            if gateway in self._dead:
                continue
            if gateway._finished:
                self._dead[gateway] = gateway._error or _Text.CALL_LOST_EXIT
                continue
            live = True
            busy = self._busy.get(gateway, 0)
            if busy < self.per_gateway and (best is None or busy < best[0]):
                best = (busy, gateway, position)
        if best is not None:
            self._turn = best[2] + 1
        return (best and best[1]), live


def _fail(future, exc):
    try:
        future.set_exception(exc)
    except Exception:  # cancelled or done meanwhile
        pass


# === 12. Import forwarding ===
#
# popen//forward=mypkg,other (or forward=*): code in the remote may import
# those top-level packages from the local side.  _remote_main puts a
# _ForwardFinder last on the remote's sys.meta_path; Group._start attaches a
# _ForwardServer to the local gateway.  They talk on the reserved channel
# _FORWARD_CID (odd, like the local side's ids, but one the local counter
# never reaches), so a via= chain carries it end to end, and the proxy that
# relays a far remote's stream (the hop) answers from its own cache what it
# has seen answered before (see "The hop cache" below):
#
#   remote -> local   (request id, "dotted.name")
#   local -> remote   (request id, ("ok", source, is_package, path, host), more)
#                     (request id, ("refused", reason), {})
#
# more: with forward_preload, {name: ("ok", ...)} for the allowed modules the
# answered one imports statically (found with ast, transitively), which the
# remote keeps for later imports: one round trip instead of one per module.
# The remote also keeps every answer it got; a via= hop keeps them for all
# the forward= remotes it relays (_HopRelay), without a message of its own.
#
# The local side resolves names with PathFinder on sys.path and on the
# parent's spec, so it never imports (never runs) anything, not even a
# parent package, and answers in a thread of its own (file I/O).  It sends
# only .py sources of allowed, non-stdlib modules; the remote never names a
# path.  The remote compiles with its own Python under the import lock.

_FORWARD_CID = 0xFFFFFFFF


def _forward_allowed(value):
    """'*' or a frozenset of top-level names, from the forward= value."""
    if value in (None, "", False):
        return None
    value = value.strip()
    if value == "*":
        return "*"
    return frozenset(part.strip() for part in value.split(",") if part.strip())


class _ForwardLoader:
    """Executes forwarded source, compiled by this (remote) Python."""

    def __init__(self, source, is_package):
        self.source = source
        self.is_package_ = is_package

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        filename = module.__spec__.origin
        try:
            code = compile(self.source, filename, "exec", dont_inherit=True)
        except SyntaxError as exc:
            error = SyntaxError(_Text.FORWARD_SYNTAX % (
                name, sys.version.split()[0], exc.msg), (
                filename, exc.lineno, exc.offset, exc.text))
            raise error from None
        _remember_source(filename, self.source)
        exec(code, module.__dict__)

    def get_source(self, name):
        return self.source

    def is_package(self, name):
        return self.is_package_


class _ForwardFinder:
    """On the remote's sys.meta_path: asks the local side for allowed modules."""

    def __init__(self, gateway, allowed):
        self._allowed = allowed
        self._lock = threading.Lock()
        self._next = 0
        self._waiting = {}
        self._cache = {}   # name -> an "ok" answer, asked for or preloaded
        self._channel = gateway._new_channel(_FORWARD_CID)
        self._channel.setcallback(self._on_reply, endmarker=None)

    def _on_reply(self, item):  # receiver thread: hand over, never block
        with self._lock:
            if item is None:  # the gateway is closing: nobody will answer
                entries = list(self._waiting.values())
                self._waiting.clear()
                for entry in entries:
                    entry[1] = ("refused", "the gateway closed")
                    entry[0].set()
                return
            entry = self._waiting.pop(item[0], None)
            self._cache.update(item[2])
            if entry is not None and item[1][0] == "ok":
                self._cache[entry[2]] = item[1]
        if entry is not None:
            entry[1] = item[1]
            entry[0].set()

    def _ask(self, fullname):
        entry = [threading.Event(), None, fullname]
        with self._lock:
            if fullname in self._cache:
                return self._cache[fullname]
            self._next += 1
            reqid = self._next
            self._waiting[reqid] = entry
        try:
            self._channel.send((reqid, fullname))
        except (OSError, ValueError) as exc:
            with self._lock:
                self._waiting.pop(reqid, None)
            return ("refused", "cannot ask the local side: %s" % (exc,))
        entry[0].wait()
        return entry[1]

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if self._allowed != "*" and top not in self._allowed:
            return None
        reply = self._ask(fullname)
        if reply[0] != "ok":
            raise ModuleNotFoundError(_Text.FORWARD_REFUSED % (fullname, reply[1]),
                                      name=fullname)
        import importlib.machinery

        source, is_package, path, host = reply[1:5]
        spec = importlib.machinery.ModuleSpec(
            fullname, _ForwardLoader(source, is_package),
            origin="<forwarded from %s:%s>" % (host, path), is_package=is_package)
        spec.has_location = True  # so __file__ is set (to the honest origin)
        if is_package:
            spec.submodule_search_locations = [
                "<forwarded from %s:%s>" % (host, os.path.dirname(path))]
        return spec


def _install_forward_finder(gateway, value):
    """Remote side: forwarding on (called by _remote_main when asked)."""
    finder = _ForwardFinder(gateway, _forward_allowed(value))
    sys.meta_path.append(finder)
    return finder


def _forward_lookup(name, allowed):
    """Local side: ("ok", source, is_package, path, host) or ("refused", why)."""
    import importlib.machinery
    import importlib.util

    if (not isinstance(name, str) or len(name) > 500
            or not all(part.isidentifier() for part in name.split("."))):
        return ("refused", _Text.FORWARD_BAD_NAME % (name,))
    top = name.partition(".")[0]
    if allowed is None or (allowed != "*" and top not in allowed):
        return ("refused", _Text.FORWARD_NOT_ALLOWED % (top,))
    stdlib_names = getattr(sys, "stdlib_module_names", ())  # 3.10+
    if top in stdlib_names or top in sys.builtin_module_names:
        return ("refused", _Text.FORWARD_STDLIB)
    spec = None
    search = None  # sys.path for a top-level name, else the parent's locations
    for depth, part in enumerate(name.split(".")):
        prefix = ".".join(name.split(".")[:depth + 1])
        if depth and not search:
            return ("refused", _Text.FORWARD_NOT_FOUND)
        try:  # PathFinder: finds without importing anything, even parents
            spec = importlib.machinery.PathFinder.find_spec(prefix, search)
        except (ImportError, ValueError, OSError):
            spec = None
        if spec is None:
            return ("refused", _Text.FORWARD_NOT_FOUND)
        search = spec.submodule_search_locations
    if not isinstance(spec.loader, importlib.machinery.SourceFileLoader) or not (
            spec.origin or "").endswith(".py"):
        return ("refused", _Text.FORWARD_NOT_SOURCE % (spec.origin,))
    path = os.path.realpath(spec.origin)
    if _in_stdlib(path):
        return ("refused", _Text.FORWARD_STDLIB)
    try:
        with open(path, "rb") as f:
            source = importlib.util.decode_source(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        return ("refused", _Text.FORWARD_UNREADABLE % (exc,))
    import socket

    return ("ok", source, spec.submodule_search_locations is not None, path,
            socket.gethostname())


def _in_stdlib(path):
    """True for a file of this Python's standard library (not site-packages)."""
    import sysconfig

    paths = sysconfig.get_paths()
    inside = lambda root: root and path.startswith(os.path.realpath(root) + os.sep)
    if inside(paths.get("purelib")) or inside(paths.get("platlib")):
        return False
    return bool(inside(paths.get("stdlib")) or inside(paths.get("platstdlib")))


def _static_imports(name, source, is_package):
    """Absolute names that module `name` imports at top level or anywhere (ast)."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts) or not package:
                    continue
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base:
                found.append(base)
            found.extend(base + "." + alias.name if base else alias.name
                         for alias in node.names if alias.name != "*")
    names = []
    for full in found:  # and the packages on the way: importing a.b.c needs a.b
        parts = full.split(".")
        names.extend(".".join(parts[:i + 1]) for i in range(len(parts)))
    return names


def _forward_closure(name, reply, allowed, limit=500):
    """{name: answer} of the allowed modules `name` imports, transitively."""
    more = {}
    seen = {name}
    todo = _static_imports(name, reply[1], reply[2])
    while todo and len(more) < limit:
        other = todo.pop()
        if other in seen:
            continue
        seen.add(other)
        top = other.partition(".")[0]
        if allowed != "*" and top not in allowed:
            continue
        answer = _forward_lookup(other, allowed)
        if answer[0] == "ok":  # names that are attributes, not modules, drop out here
            more[other] = answer
            todo.extend(_static_imports(other, answer[1], answer[2]))
    return more


class _ForwardServer:
    """Local side: answers a gateway's forwarded-import requests."""

    def __init__(self, gateway, value, preload=False):
        self._allowed = _forward_allowed(value)
        self._preload = preload
        self.asked = []   # the (first 1000) names asked for: what a via= hop's cache saves
        gateway._forward_server = self
        self._channel = gateway._new_channel(_FORWARD_CID)
        self._channel.setcallback(self._on_request)

    def _on_request(self, item):  # receiver thread: file I/O goes elsewhere
        _daemon(self._answer, (item,), "execnet_single-forward")

    def _answer(self, item):
        if type(item) is not tuple or len(item) != 2:
            return
        if len(self.asked) < 1000:  # bounded: a remote may ask for anything, endlessly
            name = item[1]
            self.asked.append(name if type(name) is str and len(name) <= 500
                              else "<%s>" % type(name).__name__)
        reply = _forward_lookup(item[1], self._allowed)
        more = {}
        if self._preload and reply[0] == "ok":
            more = _forward_closure(item[1], reply, self._allowed)
        _trace("forward", item[1], reply[0], len(more))
        try:
            self._channel.send((item[0], reply, more))
        except (OSError, ValueError):
            pass  # the gateway is gone


# --- The hop cache: a via= relay that answers what it has seen answered ---
#
# A via= hop relays a far remote's bytes (_serve_via).  When that remote was
# started with forward=, the relay also reads the frame headers going by
# (_FrameScan: headers only; payloads are sliced out only for frames on
# _FORWARD_CID) and _HopRelay does two things, with no message of its own:
#
# - local -> child: an answer on _FORWARD_CID to a request the relay saw go
#   up is recorded, if "ok" (with the preloaded `more`), in _HOP_CACHE, one
#   dict per hop process keyed by (allow-list, name), so a remote with a
#   narrower forward= never gets what only a wider one was sent.  The bytes
#   go on unchanged.
# - child -> local: a well-formed request for a name the cache holds under
#   the child's allow-list is not passed up.  The relay writes the answer
#   (request id, answer, more) into the child's stdin itself, at a frame
#   boundary of the local side's stream: the from_child thread writes it
#   only while to_child is idle between frames, else leaves it to to_child,
#   which writes it at the next boundary (one lock orders the two), together
#   with the acknowledgement the local side would have sent for the
#   request; the child's later acknowledgements of the injected bytes are
#   not passed up (the local side never sent them).  more is empty unless
#   the child has forward_preload; then it is what the hop holds of the
#   module's static imports (as _forward_closure, but from the cache).
#
# Anything else, including every byte of a stream that turns out not to be
# frames, passes unchanged, and from then on that direction is relayed
# plainly.  A sealed stream is never read; forward off: no reading at all.
# In a chain (c via b, b via a), b's relay reads c's stream; a carries it
# inside one of b's channels and does not look into it.
# The cache lives as long as the hop process: a far remote started later
# gets the source as the hop first saw it (each remote keeps its own copy
# for its lifetime just the same).

_HOP_CACHE = {}          # (allowed, name) -> (answer, names preloaded with it)
_HOP_CACHE_LOCK = threading.Lock()
_HOP_CACHE_MAX = [4096]  # entries kept at most; 0 turns the cache off (benchmark)


class _FrameScan:
    """Frame boundaries of a byte stream fed in pieces of any size.

    Only headers are parsed; the payloads of frames on channel `cid` with a
    code in `codes` and at most `limit` bytes long are collected.  feed()
    returns (frames, first, at_end): frames is a list of (start, end, code,
    payload) for those frames ending in this piece (start < 0: the frame
    began in an earlier piece; payload None: not collected), first the first
    frame boundary inside the piece (None if there is none), at_end whether
    the piece ends at a boundary.  A header no frame can have raises LoadError.
    """

    def __init__(self, cid, codes, limit):
        self._cid = cid
        self._codes = codes
        self._limit = limit
        self._head = b""     # a header cut by a piece's end
        self._left = 0       # payload bytes of the current frame still to come
        self._frame = None   # (start, code, match, collect) of the current frame
        self._parts = []     # its payload so far, when collected
        self._offset = 0     # bytes fed before this piece

    def feed(self, data):
        frames = []
        size = len(data)
        pos = 0
        first = 0 if (self._frame is None and not self._head) else None
        unpack = _HEADER.unpack_from
        while pos < size:
            if self._frame is None:
                if self._head or size - pos < _HEADER_SIZE:
                    take = bytes(data[pos:pos + _HEADER_SIZE - len(self._head)])
                    self._head += take
                    pos += len(take)
                    if len(self._head) < _HEADER_SIZE:
                        break
                    header, self._head = self._head, b""
                    code, cid, length = _HEADER.unpack(header)
                else:
                    code, cid, length = unpack(data, pos)
                    pos += _HEADER_SIZE
                if code > _LAST_MSGCODE or length > _MAX_PAYLOAD:
                    raise LoadError("not a frame header at stream offset %d" % (
                        self._offset + pos - _HEADER_SIZE))
                match = cid == self._cid and code in self._codes
                self._frame = (self._offset + pos - _HEADER_SIZE, code, match,
                               match and length <= self._limit)
                self._left = length
            take = min(self._left, size - pos)
            if self._frame[3] and take:
                self._parts.append(bytes(data[pos:pos + take]))
            pos += take
            self._left -= take
            if self._left:
                break
            start, code, match, collect = self._frame
            self._frame = None
            if first is None:
                first = pos
            if match:
                frames.append((start - self._offset, pos, code,
                               b"".join(self._parts) if collect else None))
                self._parts = []
        at_end = self._frame is None and not self._head
        self._offset += size
        return frames, first, at_end


def _hop_cache_get(allowed, name, preload):
    """(answer, more) from the cache, or None.  more, for a remote with
    forward_preload: what the local side sent with the answer, and what the
    cache holds of the modules it imports statically (as _forward_closure)."""
    with _HOP_CACHE_LOCK:
        entry = _HOP_CACHE.get((allowed, name))
        if entry is None or not preload:
            return entry and (entry[0], {})
        more = {}
        todo = list(entry[1]) + _static_imports(name, entry[0][1], entry[0][2])
        while todo:
            other = todo.pop()
            found = _HOP_CACHE.get((allowed, other))
            if other != name and other not in more and found is not None:
                more[other] = found[0]
                todo.extend(_static_imports(other, found[0][1], found[0][2]))
        return entry[0], more


def _hop_cache_put(allowed, name, answer, more):
    with _HOP_CACHE_LOCK:
        for other, other_answer in more.items():
            if (len(_HOP_CACHE) < _HOP_CACHE_MAX[0] and _forward_answer_ok(other_answer)
                    and _forward_permits(allowed, other)):
                _HOP_CACHE.setdefault((allowed, other), (other_answer, ()))
        if len(_HOP_CACHE) < _HOP_CACHE_MAX[0] or (allowed, name) in _HOP_CACHE:
            _HOP_CACHE[(allowed, name)] = (answer, tuple(sorted(
                other for other in more if (allowed, other) in _HOP_CACHE)))


def _forward_permits(allowed, name):
    """Whether the allow-list covers module `name` (a str)."""
    return isinstance(name, str) and (allowed == "*" or name.partition(".")[0] in allowed)


def _forward_answer_ok(answer):
    """Whether answer is a well-formed "ok" answer (see the top of the section)."""
    return (type(answer) is tuple and len(answer) == 5 and answer[0] == "ok"
            and isinstance(answer[1], str) and isinstance(answer[3], str))


class _HopRelay:
    """In a via= hop: the relay of one forward= remote's frames, with the cache."""

    def __init__(self, io, allowed, preload):
        self._io = io
        self._allowed = allowed
        self._preload = preload
        self._down = _FrameScan(_FORWARD_CID, (_MSG_DATA, _MSG_DATA_PART), _MAX_PAYLOAD)
        self._up = _FrameScan(_FORWARD_CID, (_MSG_DATA, _MSG_DATA_PART, _MSG_ACK), 4096)
        self._lock = threading.Lock()
        self._idle = True      # to_child is between two whole frames, not writing
        self._pending = []     # answers to write at the next boundary
        self._asked = {}       # request id -> name (None: not to keep), passed up, unanswered
        self._parts = []       # pieces of a large answer going down
        self._up_parts = False  # the child's item being sent up came in pieces
        self._owed = 0         # injected bytes whose acknowledgements stay here

    # -- local -> child: the to_child thread --

    def down(self, data):
        """Write data to the child, and any injected answers at a boundary."""
        first, at_end = None, False
        if self._down is not None:
            try:
                frames, first, at_end = self._down.feed(data)
            except LoadError:
                self._down = None   # not frames after all: relay plainly, inject nothing
                frames = []
            for start, end, code, payload in frames:
                self._record(code, payload)
        io = self._io
        with self._lock:
            self._idle = False
        if first is not None and first < len(data) and self._pending:
            view = memoryview(data)
            io.write(view[:first])
            with self._lock:
                pending, self._pending = self._pending, []
            io.writev(pending)
            io.write(view[first:])
        else:
            io.write(data)
        with self._lock:
            if at_end and self._down is not None:
                if self._pending:
                    io.writev(self._pending)
                    self._pending = []
                self._idle = True

    def _record(self, code, payload):
        if code == _MSG_DATA_PART:
            if payload is not None and sum(len(p) for p in self._parts) < _MAX_ITEM // 16:
                self._parts.append(payload)
            else:
                self._parts = [None]   # too large to keep: this item is not recorded
            return
        parts, self._parts = self._parts, []
        if payload is None or None in parts:
            return
        try:
            reqid, answer, more = loads(b"".join(parts) + payload)
        except (LoadError, TypeError, ValueError):
            return
        with self._lock:
            name = self._asked.pop(reqid, None) if isinstance(reqid, int) else None
        if name is not None and _forward_answer_ok(answer) and type(more) is dict:
            _hop_cache_put(self._allowed, name, answer, more)

    # -- child -> local: the from_child thread --

    def up(self, data):
        """The bytes to pass up for data from the child (requests answered here left out)."""
        if self._up is None:
            return data
        try:
            frames = self._up.feed(data)[0]
        except LoadError:
            self._up = None   # garbage: the local side will say so; we only relay
            return data
        out = []
        pos = 0
        for start, end, code, payload in frames:
            instead = self._from_child(code, payload, start >= 0)
            if instead is not None:
                out.append(data[pos:start])
                out.append(instead)
                pos = end
        if not out:
            return data
        out.append(data[pos:])
        return b"".join(out)

    def _from_child(self, code, payload, whole):
        """None to pass the frame on, else the bytes to pass instead."""
        if code == _MSG_DATA_PART:
            self._up_parts = True
            return None
        if code == _MSG_ACK:
            if not (whole and self._owed and payload is not None and len(payload) == 4):
                return None
            count = _COUNT.unpack(payload)[0]
            kept = min(count, self._owed)
            self._owed -= kept
            return _encode_frame(_MSG_ACK, _FORWARD_CID, _COUNT.pack(count - kept)) if (
                count > kept) else b""
        in_pieces, self._up_parts = self._up_parts, False
        if payload is None or in_pieces:
            return None
        try:
            request = loads(payload)
        except (LoadError, TypeError, ValueError):
            return None
        if (type(request) is not tuple or len(request) != 2 or type(request[0]) is not int
                or not _forward_permits(self._allowed, request[1])):
            return None   # the local side refuses or ignores it, as without a hop
        reqid, name = request
        found = None
        if whole and self._down is not None:
            found = _hop_cache_get(self._allowed, name, self._preload)
        if found is None:
            with self._lock:  # an id asked twice at once: neither answer is kept
                self._asked[reqid] = None if reqid in self._asked else name
            return None
        try:
            item = dumps((reqid, found[0], found[1]))
        except DumpError:
            return None
        pieces = [item[i:i + _CHUNK] for i in range(0, len(item), _CHUNK)]
        frames = [_encode_frame(_MSG_DATA_PART, _FORWARD_CID, piece) for piece in pieces[:-1]]
        frames.append(_encode_frame(_MSG_DATA, _FORWARD_CID, pieces[-1]))
        # the acknowledgement the local side would have sent for the request
        frames.append(_encode_frame(_MSG_ACK, _FORWARD_CID, _COUNT.pack(len(payload))))
        self._owed += len(item)
        _trace("forward", name, "answered by the hop", len(found[1]))
        self._inject(b"".join(frames))
        return b""

    def _inject(self, frames):
        # Writing to the child's stdin from this thread, which also drains its
        # stdout, cannot deadlock: the child's receiver thread never waits for
        # its own output to drain (what it sends is queued), so stdin drains.
        with self._lock:
            if not self._idle:
                self._pending.append(frames)
                return
            try:
                self._io.write(frames)
            except (OSError, ValueError):
                pass  # the child is gone; from_child sees its end


# === 13. Socket server ===
#
# `python -m execnet_single serve`.  Each accepted connection gets a thread
# for the handshake of section 9 (at most max_handshakes at once, each done
# within handshake_timeout or dropped).  Keyless peers that hold every slot
# (idle, reconnecting when dropped) must not lock clients out: when the
# slots are full, the next connection evicts the oldest pending handshake,
# once that is older than _HANDSHAKE_GRACE of the timeout (so that no flood
# cuts a client off mid-handshake); until then new connections wait in the
# listen backlog, in order, and a peer that reconnects queues up behind the
# client it was evicted for.  One address other than loopback holds at most
# half the slots (beyond that its own oldest goes, or the new one is dropped).
# An authenticated plain-TCP connection becomes the stdin and stdout of a
# fresh `python -c _STAGE1_SEALED` (the session keys on a pipe of their own),
# which runs only the sealed bootstrap record the client sends (sections 4
# and 8): every client has an interpreter of its own, so its crash or
# os._exit ends only its session.  Under TLS the interpreter is a `python -c
# _STAGE1` bootstrapped like a popen gateway, on pipes relayed to the TLS
# socket by two threads; --insecure servers give it the connection itself.

_MAX_HANDSHAKES = 32
_HANDSHAKE_GRACE = 0.1   # of handshake_timeout: the age below which none is evicted


class _Pending:
    """A handshake in progress: its start, peer address and socket."""

    __slots__ = ("start", "host", "conn", "evicted")

    def __init__(self, start, host, conn):
        self.start = start
        self.host = host
        self.conn = conn
        self.evicted = False


def _is_loopback(host):
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_stderr(msg):
    try:
        sys.stderr.write("execnet_single serve: %s\n" % (msg,))
        sys.stderr.flush()
    except Exception:
        pass


class _SocketServer:
    """A listening socket and its accept loop; stop() ends serve_forever()."""

    def __init__(self, host="127.0.0.1", port=0, key=None, once=False, tls_context=None,
                 handshake_timeout=_HANDSHAKE_TIMEOUT, max_handshakes=_MAX_HANDSHAKES,
                 log=_log_stderr):
        import socket

        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)   # a flood waits here, in order, not in threads
            sock.settimeout(0.5)   # how often the loop looks at stop()
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self._key = key
        self._once = once
        self._tls = tls_context
        self._timeout = handshake_timeout
        self._max = max_handshakes
        self._per_address = max(1, max_handshakes // 2)
        self._grace = handshake_timeout * _HANDSHAKE_GRACE
        self._pending = []   # _Pending entries, oldest first (under _lock)
        self._freed = threading.Event()   # a pending handshake ended
        self._full = False
        self._log = log
        self._lock = threading.Lock()
        self._sessions = set()
        self._served = False
        self._stop = threading.Event()
        self._done = threading.Event()   # --once: the one session has started

    def stop(self):
        """Make serve_forever() return (sessions still running are ended)."""
        self._stop.set()

    def serve_forever(self):
        """Accept and serve clients until stop() (or, with once, one session ended)."""
        import socket
        import time

        try:
            while not (self._stop.is_set() or self._done.is_set()):
                self._freed.clear()
                wait = self._full_for()
                if wait:
                    # every slot holds a young handshake: new connections wait
                    # in the listen backlog, in order and holding no thread,
                    # until a handshake ends or the oldest may be evicted
                    self._freed.wait(wait)
                    continue
                try:
                    conn, addr = self._sock.accept()
                except socket.timeout:
                    continue
                except OSError as exc:  # e.g. out of fds during a flood
                    self._log("accept failed: %s" % (exc,))
                    time.sleep(0.1)
                    continue
                peer = "%s:%s" % tuple(addr[:2])
                pending = self._admit(addr[0], conn, peer)
                if pending is None:
                    conn.close()
                    continue
                _daemon(self._handle, (conn, peer, pending), "execnet_single-serve-%s" % peer)
        finally:
            self._sock.close()
        while self._sessions and not self._stop.wait(0.2):
            pass   # --once: the session ends by itself, or stop() ends it
        self._end_sessions()

    def _full_for(self):
        """Seconds until a new connection can have a slot (0: now), at most 0.5."""
        import time

        with self._lock:
            if len(self._pending) < self._max or not self._pending:
                self._full = False
                return 0
            wait = self._pending[0].start + self._grace - time.monotonic()
            if wait > 0 and not self._full:
                self._full = True
                self._log(_Text.SLOTS_FULL % (self._max, self._grace))
            return min(wait, 0.5) if wait > 0 else 0

    def _admit(self, host, conn, peer):
        """A _Pending slot for a new connection (evicting the oldest pending
        handshake if all slots, or its address's share, are taken), or None:
        drop the connection."""
        import socket
        import time

        now = time.monotonic()
        with self._lock:
            pending = self._pending
            victims = pending if len(pending) >= self._max else []
            if not _is_loopback(host):
                same = [entry for entry in pending if entry.host == host]
                if len(same) >= self._per_address:
                    victims = same
            if victims:
                oldest = victims[0]
                if now - oldest.start < self._grace:
                    self._log("dropped %s: %s" % (peer, _Text.DROP_BUSY % len(victims)))
                    return None
                pending.remove(oldest)
                oldest.evicted = True
                try:   # its thread's read ends; the thread drops it
                    socket.socket.shutdown(oldest.conn, socket.SHUT_RDWR)
                except OSError:
                    pass
            entry = _Pending(now, host, conn)
            pending.append(entry)
            return entry

    def _release(self, pending):
        """pending's handshake ended (lock held): its slot is free."""
        if pending in self._pending:
            self._pending.remove(pending)
            self._freed.set()

    def _handle(self, conn, peer, pending):
        """Authenticate one connection, then run its session (in this thread)."""
        import socket
        import time

        try:
            try:
                if self._once and self._served:   # (checked again once authenticated)
                    raise AuthenticationError(_Text.DROP_ONCE)
                deadline = time.time() + self._timeout
                conn.settimeout(self._timeout)
                if self._tls is not None:
                    conn = self._tls.wrap_socket(conn, server_side=True,
                                                 do_handshake_on_connect=False)
                    with self._lock:   # an eviction must shut this one down
                        pending.conn = conn
                        evicted = pending.evicted
                    if evicted:
                        raise AuthenticationError(_Text.DROP_EVICTED)
                    conn.do_handshake()
                keys = None
                if self._key is None:
                    conn.sendall(_OPEN_MAGIC)
                else:
                    keys = _server_auth(conn, self._key, deadline, self._tls is None)
                conn.settimeout(None)
                with self._lock:
                    if pending.evicted:
                        raise AuthenticationError(_Text.DROP_EVICTED)
                    self._release(pending)
                    if self._once and self._served:
                        raise AuthenticationError(_Text.DROP_ONCE)
                    self._served = True
            finally:
                with self._lock:
                    self._release(pending)
        except socket.timeout:
            self._drop(conn, peer, _Text.DROP_TIMEOUT % self._timeout)
            return
        except AuthenticationError as exc:
            self._drop(conn, peer, _Text.DROP_EVICTED if pending.evicted else exc)
            return
        except Exception as exc:  # OSError, ssl.SSLError, anything: keep serving
            self._drop(conn, peer, _Text.DROP_EVICTED if pending.evicted else "%s: %s" % (
                type(exc).__name__, exc))
            return
        try:
            self._session(conn, peer, keys)
        except Exception as exc:
            self._log("session %s failed: %s: %s" % (peer, type(exc).__name__, exc))
        finally:
            if self._once:
                self._done.set()

    def _drop(self, conn, peer, reason):
        self._log("dropped %s: %s" % (peer, reason))
        try:
            conn.close()
        except OSError:
            pass

    def _session(self, conn, peer, keys=None):
        """A fresh interpreter for an authenticated client; returns when it ends.

        keys: the session keys of a sealed session (plain TCP with a key),
        handed to the child on a pipe of their own, never in argv or the
        environment.
        """
        import subprocess

        env = dict(os.environ)
        env.pop(_KEY_ENV, None)   # the session gets no copy of the server's key
        args = [sys.executable, "-c", _STAGE1]
        if self._tls is None and not _WINDOWS:
            keyfds = ()
            if keys is not None:
                keyfds = os.pipe()
                os.write(keyfds[1], keys[0] + keys[1])   # (fits any pipe buffer)
                os.close(keyfds[1])
                args = [sys.executable, "-c", _STAGE1_SEALED, str(keyfds[0]), peer]
            try:
                child = subprocess.Popen(args, stdin=conn.fileno(), stdout=conn.fileno(),
                                         env=env, start_new_session=True,
                                         pass_fds=keyfds[:1])
            except OSError:
                conn.close()
                raise
            finally:
                if keyfds:
                    os.close(keyfds[0])
            relay = None
        else:
            # TLS, and every session on Windows (where a socket cannot be a
            # child's stdin and there is no pass_fds): pipes relayed here; a
            # sealed session's keys go first on its stdin ("-": see _STAGE1_SEALED)
            if keys is not None:
                args = [sys.executable, "-c", _STAGE1_SEALED, "-", peer]
            try:
                child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         bufsize=0, env=env, start_new_session=True)
            except OSError:
                conn.close()
                raise
            if _WINDOWS and not _end_with_me(child):
                self._log("session %s: no job object; a killed server leaves it running"
                          % peer)
            if keys is not None:
                os.write(child.stdin.fileno(), keys[0] + keys[1])   # (fits any pipe buffer)
            relay = _daemon(self._relay_to_child, (conn, child),
                            "execnet_single-relay-%s" % peer)
            # the relay may be stuck writing to a child that stopped reading
            _daemon(self._watch_client, (conn, child), "execnet_single-watch-%s" % peer)
        with self._lock:
            self._sessions.add(child)
        self._log("session %s: started pid %d" % (peer, child.pid))
        try:
            if relay is not None:
                self._relay_from_child(conn, child)
                relay.join()
                conn.close()
            else:
                self._watch_client(conn, child)
                conn.close()
            status = child.wait()
        finally:
            with self._lock:
                self._sessions.discard(child)
        self._log("session %s: ended (pid %d, status %s)%s" % (
            peer, child.pid, status, _Text.SEAL_LOG if status == _SEAL_STATUS else ""))

    @staticmethod
    def _watch_client(conn, child):
        """Plain TCP: the child owns the connection; look for the client's
        close without reading (POLLRDHUP), then end the session."""
        import select

        if _WINDOWS:
            _SocketServer._watch_client_windows(conn, child)
            return
        poller = select.poll()
        poller.register(conn.fileno(), getattr(select, "POLLRDHUP", 0x2000))
        while child.poll() is None:
            if poller.poll(500):
                break
        _SocketServer._end_child(child)

    @staticmethod
    def _watch_client_windows(conn, child):
        """_watch_client without poll(): the connection readable with no
        byte to peek at is the client's close (a relay thread reads the data).

        Not seen: a close (even a reset) behind data that the relay could not
        hand on to a session that stopped reading; that session ends when it
        reads again (test_session_stuck_in_a_c_call_ends_when_its_client_goes
        is POSIX-only for this)."""
        import select
        import socket
        import time

        while child.poll() is None:
            try:
                if select.select([conn], [], [], 0.5)[0]:
                    if not socket.socket.recv(conn, 1, socket.MSG_PEEK):
                        break
                    time.sleep(0.2)   # data the relay has yet to take
            except (OSError, ValueError):   # closed, here or by the relay
                break
        _SocketServer._end_child(child)

    @staticmethod
    def _end_child(child):
        """The client is gone: the session may finish (exit grace), then
        it is killed, stopped or busy as it may be."""
        import subprocess

        try:
            child.wait(_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            try:
                _kill_group(child)
            except OSError:
                pass

    @staticmethod
    def _relay_to_child(conn, child):
        fd = child.stdin.fileno()
        try:
            while True:
                data = conn.recv(_READ_SIZE)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        except (OSError, ValueError):
            pass
        child.stdin.close()
        _SocketServer._end_child(child)

    @staticmethod
    def _relay_from_child(conn, child):
        import socket

        try:
            while True:
                data = os.read(child.stdout.fileno(), _READ_SIZE)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        try:
            socket.socket.shutdown(conn, socket.SHUT_RDWR)   # wakes the other relay
        except OSError:
            pass
        # Closed by _session once that relay has left conn.recv: closed under
        # it, its fd could be another client's before it looks again.  But
        # on Windows only the close wakes a recv blocked in another thread.
        if _WINDOWS:
            conn.close()
        child.stdout.close()

    def _end_sessions(self):
        """Stop every session still running (SIGTERM, then SIGKILL)."""
        import signal
        import time

        with self._lock:
            children = list(self._sessions)
        for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", 9)):  # (Windows: no SIGKILL)
            for child in children:
                if child.poll() is None:
                    try:
                        _kill_group(child, sig)
                    except OSError:
                        pass
            deadline = time.time() + 2.0
            while time.time() < deadline and any(c.poll() is None for c in children):
                time.sleep(0.05)


def _serve_installed(channel):
    """In the installing gateway's process: serve one client in a thread.

    The remote_exec returns at once, so this works through a
    main_thread_only gateway too.
    """
    host, port, key = channel.receive()
    server = _SocketServer(host, port, key, once=True, log=_trace)
    channel.send((server.host, server.port))
    _daemon(server.serve_forever, (), "execnet_single-installed")


def _server_tls_context(cert, key=None, client_ca=None):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls_1_2_or_later(context)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _server_key(key_file=None, insecure=False):
    """(key or None, what to tell clients about it): the file, else the
    environment, else the per-user key file (created if missing)."""
    if insecure:
        return None, None
    if key_file:
        return _read_key_file(key_file), key_file
    key = _env_key()
    if key is not None:
        return key, None
    path = _default_key_path()
    _check_key_dir(path)
    if not os.path.exists(path):
        _write_new_key(path)
        _log_stderr("created key file %s" % path)
    return _read_key_file(path), path


def _make_server(host="127.0.0.1", port=0, key_file=None, insecure=False, once=False,
                 tls_cert=None, tls_key=None, tls_client_ca=None,
                 handshake_timeout=_HANDSHAKE_TIMEOUT, max_handshakes=_MAX_HANDSHAKES,
                 log=_log_stderr):
    """(server, key file path or None) for serve() and the CLI."""
    if insecure and not _is_loopback(host):
        raise ValueError(_Text.INSECURE_NOT_LOOPBACK % (host,))
    if max_handshakes < 1:
        raise ValueError(_Text.BAD_MAX_HANDSHAKES % max_handshakes)
    key, key_path = _server_key(key_file, insecure)
    context = _server_tls_context(tls_cert, tls_key, tls_client_ca) if tls_cert else None
    server = _SocketServer(host, port, key, once, context, handshake_timeout,
                           max_handshakes, log)
    return server, key_path


def serve(host="127.0.0.1", port=0, key_file=None, insecure=False, once=False,
          tls_cert=None, tls_key=None, tls_client_ca=None,
          handshake_timeout=_HANDSHAKE_TIMEOUT, max_handshakes=_MAX_HANDSHAKES):
    """Run the authenticated socket server until interrupted (or, with once,
    until its one client is done).  The key: key_file, else
    $EXECNET_SINGLE_KEY, else the per-user key file (created if missing)."""
    server, key_path = _make_server(host, port, key_file, insecure, once, tls_cert, tls_key,
                                    tls_client_ca, handshake_timeout, max_handshakes)
    _warn_unprotected(server, insecure, bool(tls_cert))
    _log_stderr(_banner(server, key_path, insecure, bool(tls_cert)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server._end_sessions()


def _warn_unprotected(server, insecure, tls):
    """One line on stderr when sessions lack a protection users may assume."""
    where = "%s:%d" % (server.host, server.port)
    if insecure:
        _log_stderr(_Text.INSECURE_WARNING % where)
    elif not tls and not _is_loopback(server.host):
        _log_stderr(_Text.NOT_ENCRYPTED_WARNING % where)


def _banner(server, key_path, insecure, tls):
    host = server.host if ":" not in server.host else "[%s]" % server.host
    spec = "socket=%s:%d" % (host, server.port)
    if key_path:
        spec += "//keyfile=%s" % key_path
        keyinfo = "key file %s" % key_path
    elif insecure:
        spec += "//insecure"
        keyinfo = "NO authentication (--insecure)"
    else:
        keyinfo = "key from $%s" % _KEY_ENV
    if tls:
        spec += "//tls_ca=CA_FILE"
    return "execnet_single %s: listening on %s:%d%s, %s; connect with: %s" % (
        __version__, host, server.port, " (TLS)" if tls else "", keyinfo, spec)


# === 14. CLI ===
#
# `python -m execnet_single pytest ARGS` runs pytest here with `execnet`
# resolved to this module, and passes `-p execnet_single`: pytest loads this
# module as a plugin here and (xdist copies the arguments) in every worker,
# where pytest_plugin_registered below quiets the worker's own terminal
# report.  execnet sends a popen remote's fd 1 to /dev/null and xdist counts
# on that; this module forwards remote output, so the plugin is what keeps
# xdist's terminal as on execnet, while `-s` test prints still arrive,
# prefixed with the worker id.


def install_as_execnet():
    """Make `import execnet` give this module, here and on every gateway started from here."""
    me = sys.modules[__name__]
    # execnet.gateway_base: where pytest-xdist before 3.6 imports dumps from
    for name in ("execnet", "execnet.gateway_base"):
        sys.modules[name] = me
        _alias_state["forced"].add(name)
    return me


def pytest_plugin_registered(plugin, manager):
    """pytest hook, active with `-p execnet_single`: quiets an xdist worker's terminal report."""
    if manager.getplugin("terminalreporter") is not plugin:
        return
    config = getattr(plugin, "config", None)
    if not hasattr(config, "workerinput"):
        return  # not in an xdist worker: the report is the user's
    import io

    # pytest is the caller's (loaded, since it calls this hook), never ours
    create_terminal_writer = getattr(sys.modules.get("_pytest.config"),
                                     "create_terminal_writer", None)
    if create_terminal_writer is None:  # a pytest we do not know: leave it
        return

    class NullText(io.TextIOBase):
        def write(self, text):
            return len(text)

    plugin._tw = create_terminal_writer(config, NullText())


_PRELOAD_ENV = "EXECNET_SINGLE_PRELOAD"


def _pytest_preload_names(modules):
    """The loaded modules a worker may import before pytest's rewrite hook: pytest, pluggy."""
    # Plugins (entry points, -p, conftest) are marked for assertion rewriting:
    # imported early they would warn "Module already imported so cannot be
    # rewritten" and lose rewriting, so only pytest's own core is preloaded.
    return sorted(name for name in modules
                  if name in ("pytest", "pluggy") or name.startswith(("_pytest.", "pluggy.")))


def pytest_xdist_setupnodes(config, specs):
    """pytest-xdist hook, under `python -m execnet_single pytest`: popen workers start warm."""
    if not _alias_state.get("cli_pytest") or os.environ.get(_PRELOAD_ENV, "1") == "0":
        return
    names = _pytest_preload_names(sys.modules)
    for spec in specs:
        # set in place: xdist's status display already keys on these spec objects;
        # only this interpreter is known to have the very same pytest to preload
        if spec.popen and not (spec.preload or spec.via or spec.python):
            spec.preload = ",".join(names)


# An optional hook, as @pytest.hookimpl(optionalhook=True) marks one (pytest
# is not imported here): pytest knows it only while pytest-xdist is loaded,
# and `-p no:xdist` (or no xdist at all) must not make it an error.
pytest_xdist_setupnodes.pytest_impl = {"optionalhook": True, "hookwrapper": False,
                                       "wrapper": False, "tryfirst": False,
                                       "trylast": False, "specname": None}


def _cli_pytest(args):
    """`python -m execnet_single pytest ARGS`; returns pytest's exit status."""
    if __name__ == "__main__":
        # run as a script: the importable copy is the one pytest and xdist see
        import execnet_single as module
    else:
        module = sys.modules[__name__]
    module.install_as_execnet()
    module._alias_state["cli_pytest"] = True   # warm popen workers (pytest_xdist_setupnodes)
    import importlib

    if os.environ.get(_PRELOAD_ENV, "1") != "0" and _asks_for_workers(args):
        # the workers' fork server imports pytest while this process does;
        # what its start imports here is imported first, in this thread: two
        # threads importing one module at once can see it half initialized
        # (3.13: "cannot import name 'Mapping' from 'collections.abc'")
        for name in ("subprocess", "selectors", "socket", "select", "array", "marshal",
                     "importlib.util", "errno", "codecs", "time", "collections.abc"):
            importlib.import_module(name)
        module._start_spare_fork_server(["pytest"])
    try:
        try:   # the user's pytest: this module depends on nothing outside the stdlib
            pytest = importlib.import_module("pytest")
        except ImportError as exc:
            sys.stderr.write("execnet_single: error: %s\n" % (_Text.NO_PYTEST % (exc,)))
            return 1
        return int(pytest.main(["-p", "execnet_single"] + list(args)))
    finally:
        module._close_spare_fork_servers()


def _asks_for_workers(args):
    """Do pytest's arguments (or PYTEST_ADDOPTS) ask pytest-xdist for workers?"""
    import shlex

    try:
        words = list(args) + shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    except ValueError:   # (unbalanced quotes: pytest itself says so)
        words = list(args)
    if "--" in words:
        words = words[:words.index("--")]
    for index, word in enumerate(words):
        if word in ("-n", "--numprocesses"):   # -n N, -n auto (not -n 0)
            if words[index + 1:index + 2] != ["0"]:
                return True
        elif word.startswith(("-n", "--numprocesses=")):   # -n8, -nauto, -n=8
            if word.split("=")[-1] not in ("-n0", "0"):
                return True
        elif word.startswith(("--tx", "--dist")) or word == "-d":
            return True
    return False


def _cli_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="execnet_single",
        description="execnet_single %s: the socket server (default), key files, "
                    "and running code on gateways." % __version__)
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="{serve,keygen,run,pytest}")
    serve_p = sub.add_parser(
        "serve", help="run the authenticated socket server (the default)",
        description="Serve execnet_single clients: each authenticated client gets a fresh "
                    "Python interpreter of its own.  The key comes from --key-file, else "
                    "$%s, else the per-user key file %s (created if missing)."
                    % (_KEY_ENV, _default_key_path()))
    serve_p.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1)")
    serve_p.add_argument("--port", type=int, default=8888,
                         help="port to listen on; 0 picks a free one (default 8888)")
    serve_p.add_argument("--once", action="store_true",
                         help="serve one client, then exit")
    serve_p.add_argument("--key-file", metavar="PATH",
                         help="file holding the shared key (must be mode 0600)")
    serve_p.add_argument("--insecure", action="store_true",
                         help="no authentication at all; only allowed on a loopback address")
    serve_p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate")
    serve_p.add_argument("--tls-key", metavar="PEM",
                         help="private key of --tls-cert (if not in that file)")
    serve_p.add_argument("--tls-client-ca", metavar="PEM",
                         help="require client certificates signed by this CA")
    serve_p.add_argument("--handshake-timeout", type=float, default=_HANDSHAKE_TIMEOUT,
                         metavar="SECONDS",
                         help="drop clients not authenticated within this time (default %s)"
                         % _HANDSHAKE_TIMEOUT)
    serve_p.add_argument("--max-handshakes", type=int, default=_MAX_HANDSHAKES, metavar="N",
                         help="connections beyond N authenticating at once are dropped "
                              "(default %d)" % _MAX_HANDSHAKES)
    serve_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
    keygen_p = sub.add_parser("keygen", help="write a new key file (mode 0600)")
    keygen_p.add_argument("path", nargs="?",
                          help="where to write it (default %s)" % _default_key_path())
    keygen_p.add_argument("--force", action="store_true", help="replace an existing file")
    keygen_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help=argparse.SUPPRESS)
    run_p = sub.add_parser(
        "run", help="run code on gateways and print what each sends back",
        description="Run code on one or more gateways at once; print each item it sends "
                    "on `channel`, prefixed with the gateway id.")
    source = run_p.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", dest="code", metavar="CODE", help="the code to run")
    source.add_argument("-f", dest="file", metavar="FILE", help="a file with the code to run")
    run_p.add_argument("specs", nargs="+", metavar="SPEC",
                       help="gateway xspecs, e.g. popen//python=python3.6")
    run_p.add_argument("--timeout", type=float, default=60.0,
                       help="seconds each gateway may take (default 60)")
    run_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    sub.add_parser("pytest", help="run pytest (and pytest-xdist) with execnet resolved to "
                                  "execnet_single; all further arguments are pytest's")
    return parser


def main(argv=None):
    """`python -m execnet_single [serve|keygen|run|pytest] ...`; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv[:1] == ["pytest"]:
        return _cli_pytest(argv[1:])  # every other argument is pytest's
    commands = ("serve", "keygen", "run")
    if not any(arg in commands or arg in ("-h", "--help") for arg in argv):
        argv = [a for a in argv if a == "--debug"] + ["serve"] + [
            a for a in argv if a != "--debug"]
    args = _cli_parser().parse_args(argv)
    try:
        if args.command == "keygen":
            path = _write_new_key(args.path or _default_key_path(), args.force)
            print("execnet_single: wrote a new key to %s" % path)
            return 0
        if args.command == "run":
            return _cli_run(args)
        return _cli_serve(args)
    except Exception as exc:
        if args.debug:
            raise
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
        sys.stderr.write("execnet_single: error: %s\n" % text)
        return 1


def _cli_serve(args):
    import signal

    server, key_path = _make_server(
        args.host, args.port, args.key_file, args.insecure, args.once, args.tls_cert,
        args.tls_key, args.tls_client_ca, args.handshake_timeout, args.max_handshakes)
    _warn_unprotected(server, args.insecure, bool(args.tls_cert))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: server.stop())
    print(_banner(server, key_path, args.insecure, bool(args.tls_cert)))
    sys.stdout.flush()
    server.serve_forever()
    return 0


def _cli_run(args):
    if args.file:
        with open(args.file) as f:
            code = f.read()
    else:
        code = args.code
    group = Group()
    specs = []
    for index, text in enumerate(args.specs):
        spec = XSpec(text)
        if spec.id is None:
            spec.id = "gw%d" % index
        specs.append(spec)
    failures = []
    lock = threading.Lock()

    def run_one(spec):
        try:
            gateway = group.makegateway(spec)
            channel = gateway.remote_exec(code)
            while True:
                try:
                    item = channel.receive(args.timeout)
                except EOFError:
                    break
                with lock:
                    print("[%s] %s" % (spec.id, item))
                    sys.stdout.flush()
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])
            with lock:
                failures.append(spec.id)
                sys.stderr.write("execnet_single: error: [%s] %s\n" % (spec.id, text[-1]))

    threads = [threading.Thread(target=run_one, args=(spec,)) for spec in specs]
    for thread in threads:
        thread.daemon = True
        thread.start()
    for thread in threads:
        thread.join()
    group.terminate(10.0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
