# Types for the compiled build of lb/httpproxy.py (see setup.py, lb/compiled.py): the
# session becomes an extension type with these fields, and the methods of the request
# path below are called directly. Keep the fields in step with __slots__.

cimport cython

from lb.backend cimport Backend, Server
from lb.counters cimport Counters

cdef Py_ssize_t BIN, BOUT, CLI_ABRT, CONNECT, CTIME_MAX, CTIME_SUM, DREQ, ECON, EREQ
cdef Py_ssize_t ERESP, HRSP_OTHER, INTERCEPTED, LASTSESS, LBTOT, QTIME_MAX, QTIME_SUM
cdef Py_ssize_t REQ_TOT, REUSE, RTIME_MAX, RTIME_SUM, SRV_ABRT, STOT, TIMED, TTIME_MAX
cdef Py_ssize_t TTIME_SUM, WREDIS, WRETR
from lb.h1 cimport (
    RequestHead, RequestReader, ResponseHead, chunk, request_head_bytes, response_head_bytes,
)
from lb.serverconn cimport ConnectionPool, ServerConnection


@cython.final
cdef class HttpSession:
    cdef public object frontend
    cdef public object transport
    cdef public RequestReader reader
    cdef public bytes client_ip
    cdef public double deadline
    cdef public int phase
    cdef public Py_ssize_t requests
    cdef public int paused
    cdef public list pending
    cdef public bint close_after
    cdef public RequestHead head
    cdef public Backend backend
    cdef public Server server
    cdef public ServerConnection conn
    cdef public object connect_task
    cdef public Py_ssize_t retries_left
    cdef public bytes head_bytes
    cdef public list body_buffer
    cdef public Py_ssize_t buffered
    cdef public list kept
    cdef public Py_ssize_t kept_size
    cdef public list failed
    cdef public bint l7_retry
    cdef public bint server_close
    cdef public bint touched
    cdef public bint req_done
    cdef public bint resp_started
    cdef public bint resp_done
    cdef public int resp_framing
    cdef public bint interim
    cdef public bint server_keep_alive
    cdef public bint server_until_close
    cdef public bint server_paused
    cdef public bytes tunnel_bytes
    cdef public Server sticky
    cdef public Server cookie_server
    cdef public object stick_key
    cdef public Py_ssize_t queue_id
    cdef public Server slot
    cdef public list held
    cdef public object times
    cdef public double begin
    cdef public object tunnel
    cdef public list received
    cdef public list resume
    cdef public object tracked
    cdef public bint adopted
    cdef public str stays
    cdef public dict moving
    cdef public object resp_left  # a Content-Length may not fit in 64 bits
    cdef public Counters fe_counters
    cdef public ConnectionPool pool
    cdef public object ssl
    cdef public object applet
    cdef public double t_head
    cdef public double t_queued
    cdef public double q_secs
    cdef public double t_connect
    cdef public double t_sent
    cdef public double t_resp

    cpdef data_received(self, data)
    cpdef _pause(self, int reason)
    cpdef _unpause(self, int reason)
    cpdef _process(self, list events)
    cpdef _request_head(self, RequestHead head)
    cpdef _request_data(self, data)
    cpdef _send_body(self, data)
    cpdef _request_end(self)
    cpdef _dispatch(self, exclude)
    cpdef _assign(self, server)
    cpdef _release_slot(self)
    @cython.locals(counters=Counters)
    cpdef _use(self, server)
    cpdef _keep(self, list sent)
    @cython.locals(counters=Counters)
    cpdef _attach(self, ServerConnection conn)
    cpdef _drop_server(self, bint reusable)
    cpdef response_events(self, list events)
    @cython.locals(counters=Counters, size=Py_ssize_t)
    cpdef _send(self, data)
    @cython.locals(counters=Counters, kind=int)
    cpdef bytes _response_head(self, ResponseHead head)
    cpdef _response_end(self)
    cpdef _finish_exchange(self)
    @cython.locals(counters=Counters, queue="long long", connect="long long",
                   response="long long", total="long long")
    cpdef _count_times(self)
    cpdef _reset_exchange(self)
    cpdef _close(self)
