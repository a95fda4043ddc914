# Types for the compiled build of lb/backend.py (see setup.py, lb/compiled.py): servers
# and backends read the shared memory as a C array. Keep in step with __slots__.

cimport cython

from lb.counters cimport Counters

cdef Py_ssize_t BE_HOLD, BE_TICKET, BE_VERSION, MAINT, READY, SRV_ADMIN, SRV_FIELDS, SRV_MAXCONN
cdef Py_ssize_t SRV_OP, SRV_SMAX, SRV_WEIGHT, UP


cdef class Backend


cdef class Server:
    cdef public str name
    cdef public object cfg
    cdef public Backend backend
    cdef public str host
    cdef public int port
    cdef public object cookie
    cdef public Counters counters
    cdef long long[:] _words
    cdef Py_ssize_t _base
    cdef Py_ssize_t _mine
    cdef Py_ssize_t _first
    cdef Py_ssize_t _slots
    cdef public object tls
    cdef public object sni
    @cython.locals(words="long long[:]", conns="long long", at=Py_ssize_t)
    cpdef opened(self)
    cpdef closed(self)


cdef class Backend:
    cdef public str name
    cdef public object cfg
    cdef public list servers
    cdef public object timeouts
    cdef public dict by_cookie
    cdef public dict by_name
    cdef object _shared
    cdef Py_ssize_t _base
    cdef long long _version
    cdef public object balancer
    cdef public object stick
    cdef public object retry
    cdef long long[:] _words
    cpdef long long ticket(self)
    cpdef refresh(self)
    cpdef pick(self, context, exclude=*)
