"""What pylb answered to `show info` and `show stat` (2 workers, the demo backends, 21
requests): data for the sans-IO tests of the stats page and the Prometheus exposition."""

SHOW_INFO = """\
Name: pylb
Version: 0.1.0
Release_date: 2026/11/21
Nbthread: 1
Nbproc: 1
Process_num: 1
Pid: 26665
Uptime: 0d 0h00m02s
Uptime_sec: 2
Memmax_MB: 0
PoolAlloc_MB: 0
PoolUsed_MB: 0
PoolFailed: 0
Ulimit-n: 20000
Maxsock: 20000
Maxconn: 4096
Hard_maxconn: 4096
CurrConns: 0
CumConns: 21
CumReq: 21
MaxSslConns: 0
CurrSslConns: 0
CumSslConns: 0
Maxpipes: 0
PipesUsed: 0
PipesFree: 0
ConnRate: 0
ConnRateLimit: 0
MaxConnRate: 0
SessRate: 0
SessRateLimit: 0
MaxSessRate: 0
SslRate: 0
SslRateLimit: 0
SslFrontendKeyRate: 0
SslFrontendSessionReuse_pct: 0
Tasks: 2
Run_queue: 0
Idle_pct: 100
node: vm
Workers: 2
Stopping: 0
"""

SHOW_STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,
www,FRONTEND,,,0,,4096,21,1623,2604,0,0,0,,,,,OPEN,,,,,,,,,1,1,0,,0,,0,,,,,,,0,21,0,0,0,0,,,,21,0,0,,,,,,,,,,,,,,,,,,,,,,,,,http,,,,,,,,,,,,,,,,,,,,,,,,,,-,0,0,,
app,s1,0,,0,,,11,1151,1364,0,,0,0,0,0,0,UP,1,1,0,0,0,3,,,1,2,1,,11,,2,,,,L7OK,200,8,0,11,0,0,0,0,,,,11,0,0,,,,,,,,,,,,,,,,,2,3,,,,,127.0.0.1:9001,s1,http,,,,,,,,,,,,,,,,,,,,,,,,,,-,,,,
app,s2,0,,0,,,10,1060,1240,0,,0,0,0,0,0,UP,1,1,0,0,0,3,,,1,2,2,,10,,2,,,,L7OK,200,0,0,10,0,0,0,0,,,,10,0,0,,,,,,,,,,,,,,,,,2,3,,,,,127.0.0.1:9002,s2,http,,,,,,,,,,,,,,,,,,,,,,,,,,-,,,,
app,BACKEND,0,,0,,,21,2211,2604,0,,,0,0,0,0,UP,2,2,0,,0,3,,,1,2,0,,21,,1,,,,,,,0,21,0,0,0,0,,,,21,0,0,,,,,,,,,,,,,,,,,,,,,,,,,http,roundrobin,,,,,,,,,,,,,,,,,,,,,,,,,-,,,,
"""  # noqa: E501
