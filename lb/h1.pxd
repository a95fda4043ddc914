# Types for the compiled build of lb/h1.py (see setup.py, lb/compiled.py): the classes
# become extension types with these fields. Keep in step with __slots__ and __init__.

cdef str _PLAIN, _EXPECT, _FORWARDED_FOR
cdef dict _SPECIAL, _CODES
cdef frozenset _SPECIAL_LENGTHS


cdef class Head:
    cdef public list forward
    cdef public list hop
    cdef public bint options
    cdef public bint keep_alive
    cdef public int framing
    cdef public object length  # a Content-Length may not fit in 64 bits
    cpdef list forward_lines(self, list forward, bint upgrade)

cdef class RequestHead(Head):
    cdef public bytes method
    cdef public bytes target
    cdef public str version
    cdef public bint upgrade
    cdef public bint expect_continue
    cdef public Py_ssize_t forwarded_for

cdef class ResponseHead(Head):
    cdef public int status
    cdef public bytes reason

cdef class _Reader:
    cdef public Py_ssize_t max_head
    cdef public list events
    cdef public list forward
    cdef public list hop
    cdef public bint options
    cdef public Py_ssize_t head_size
    cdef public bint in_head
    cdef public bint closed
    cdef public bint upgraded
    cdef Py_ssize_t _head_bound
    cdef Py_ssize_t _fed
    cdef object _expect
    cdef Py_ssize_t _forwarded_for
    cdef _begin(self)

cdef class RequestReader(_Reader):
    cdef object _parser
    cdef list _url
    cdef Py_ssize_t _pending_bytes
    cdef public RequestHead head
    cpdef list feed(self, data)

cdef class ResponseReader(_Reader):
    cdef object _parser
    cdef bytes _reason
    cdef bint _head_only
    cdef bytes _buffer
    cdef public ResponseHead head
    cdef bint _chunk_end
    cdef bytes _last
    cpdef expect(self, method)
    cpdef list feed(self, data)


cpdef bytes request_head_bytes(RequestHead head, forwarded_for=*, bint close=*)
cpdef bytes response_head_bytes(ResponseHead head, int framing, bint keep_alive, str version)
cpdef bytes chunk(data)
