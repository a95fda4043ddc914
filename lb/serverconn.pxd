# Types for the compiled build of lb/serverconn.py (see setup.py, lb/compiled.py).
# Keep in step with __slots__ and __init__.

cimport cython

from lb.h1 cimport ResponseReader


@cython.final
cdef class ServerConnection:
    cdef public object server
    cdef public object pool
    cdef public object transport
    cdef public ResponseReader reader
    cdef public object session
    cdef public bint reused
    cdef public bint received
    cpdef data_received(self, data)


cdef class ConnectionPool:
    cdef public dict idle
    cpdef ServerConnection take(self, server)
    cpdef give(self, ServerConnection conn)
    cpdef discard(self, ServerConnection conn)
