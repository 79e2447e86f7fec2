"""The browser's static files: the three pages, their style sheet and script (plain HTML/CSS/JavaScript, no
library, no server: the pages open from disk).

Data files are JavaScript, not JSON: a page served from ``file://`` may not ``fetch`` files beside it, but it may
load scripts. ``data/members.js`` sets ``saeBrowser.membersData = {...}`` (it loads before the script); every other
data file is one call, ``saeBrowser.vocab({...}, [...])``,
``saeBrowser.list(m, {...})`` or ``saeBrowser.block(m, b, [...])``, whose argument is plain JSON. Pages load only
what they show: the member list loads one ``list.js``; a latent page loads the one block of latents it is in.
When a page has rendered, ``<body data-state="ok">``; a failure sets ``data-state="error"`` and shows the reason;
``data-errors`` counts script errors (the headless-browser test reads these).
"""

from __future__ import annotations

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f4f7}td.l,th.l{text-align:left}a{color:#1f5fa8}.note{color:#8a4b00;font-size:.9em}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.82em;white-space:pre-wrap;line-height:1.7;
margin:2px 0;padding:2px 4px;border-bottom:1px solid #f0f0f0}.tok{border-radius:2px;padding:1px 0}
.tok.at{outline:1.5px solid #c0392b}.tok.masked{color:#999;font-style:italic}.val{color:#666;display:inline-block;
min-width:5em}.cols{display:flex;flex-wrap:wrap;gap:2em}.err{color:#b00020;font-weight:600}
input{font-size:1em;padding:2px 6px}#pager button{margin:0 .3em}
"""

_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><link rel="stylesheet" href="style.css"></head>
<body data-page="{page}" data-state="loading" data-errors="0">
<script>window.onerror=function(){{var b=document.body;b.setAttribute('data-errors',
String(+b.getAttribute('data-errors')+1));}};</script>
<p><a href="../index.html">report</a> · <a href="index.html">members</a></p>
<div id="main">loading…</div>
<script src="data/members.js"></script>
<script src="app.js"></script>
</body></html>
"""


def page(name: str, title: str) -> str:
    """The HTML of one page (``index``, ``member`` or ``latent``)."""
    return _HEAD.format(title=title, page=name)


JS = r"""
(function(){
var SB = window.saeBrowser = window.saeBrowser || {};
var state = {members: null, vocab: null, special: {}, lists: {}, blocks: {}, pending: 0};
function $(id){return document.getElementById(id);}
function esc(s){return String(s).replace(/[&<>"]/g,function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c];});}
function params(){var p={};location.hash.replace(/^#/,'').split('&').forEach(function(kv){var a=kv.split('=');
  if(a[0])p[a[0]]=decodeURIComponent(a[1]||'');});return p;}
function fail(msg){document.body.setAttribute('data-state','error');$('main').innerHTML='<p class="err">'+esc(msg)+'</p>';}
function done(){document.body.setAttribute('data-state','ok');}
function load(src){state.pending++;var s=document.createElement('script');s.src=src;
  s.onerror=function(){fail('cannot load '+src+' (was the report folder moved or only partly copied?)');};
  document.head.appendChild(s);}
function loaded(){state.pending--;if(state.pending===0)render();}
SB.vocab=function(v,special){state.vocab=v;special.forEach(function(i){state.special[i]=1;});loaded();};
SB.list=function(m,d){state.lists[m]=d;loaded();};
SB.block=function(m,b,recs){state.blocks[m+'/'+b]=recs;loaded();};
function tok(id){if(id<0)return '';var s=state.vocab[id];if(s===undefined)s='#'+id;
  return s.replace(/\n/g,'\u21b5').replace(/\t/g,'\u21e5');}
function fmt(v){return v===null||v===undefined?'–':(Math.abs(v)>=1e4||(Math.abs(v)<1e-3&&v!==0))?v.toExponential(2):(+v.toPrecision(4)).toString();}
function member(){var p=params(),m=+p.m;var d=state.members.members[m];if(!d){fail('no member '+p.m+' in this report');return null;}return {m:m,d:d,p:p};}

function renderIndex(){var D=state.members,h='<h1>Feature browser</h1><p>'+esc(D.source)+'</p>';
  D.notes.forEach(function(n){h+='<p class="note">'+esc(n)+'</p>';});
  h+='<table><tr><th class="l">member</th><th>d_sae</th><th>latents shown</th><th>alive</th><th>tokens</th><th class="l">notes</th></tr>';
  D.members.forEach(function(d,i){h+='<tr><td class="l"><a href="member.html#m='+i+'">'+esc(d.label)+'</a></td><td>'+d.d_sae+
    '</td><td>'+d.n_shown+'</td><td>'+d.n_alive+'</td><td>'+d.n_tokens+'</td><td class="l">'+esc(d.notes.join('; '))+'</td></tr>';});
  $('main').innerHTML=h+'</table>';done();}

function renderList(){var x=member();if(!x)return;var L=state.lists[x.m],d=x.d;
  var h='<h1>'+esc(d.label)+'</h1><p>'+d.n_shown+' of '+d.d_sae+' latents, '+d.n_alive+' fired on '+d.n_tokens+' tokens. ';
  h+='Search: <input id="q" placeholder="latent index or token" value="'+esc(x.p.q||'')+'"> sort: <select id="sort">'+
    '<option value="index">index</option><option value="density">density</option><option value="max">max activation</option></select></p>';
  d.notes.forEach(function(n){h+='<p class="note">'+esc(n)+'</p>';});
  h+='<div id="pager"></div><table id="list"></table>';$('main').innerHTML=h;
  var page=0,rows=[];
  function match(i,q){if(/^#?\d+$/.test(q))return i===+q.replace('#','');var t=L.tokens[i].concat(L.logits[i]||[]);
    for(var j=0;j<t.length;j++){if(tok(t[j]).toLowerCase().indexOf(q)>=0)return true;}return false;}
  function update(){var q=$('q').value.trim().toLowerCase(),key=$('sort').value;rows=[];
    for(var i=0;i<d.n_shown;i++){if(!q||match(i,q))rows.push(i);}
    if(key!=='index')rows.sort(function(a,b){return L[key][b]-L[key][a];});page=0;draw();}
  function draw(){var n=100,h='<tr><th>latent</th><th>density</th><th>max activation</th><th class="l">top-activating tokens</th><th class="l">promoted tokens</th></tr>';
    rows.slice(page*n,page*n+n).forEach(function(i){h+='<tr><td><a href="latent.html#m='+x.m+'&l='+i+'">'+i+'</a></td><td>'+
      fmt(L.density[i])+'</td><td>'+fmt(L.max[i])+'</td><td class="l">'+esc(L.tokens[i].map(tok).join(' | '))+
      '</td><td class="l">'+esc((L.logits[i]||[]).map(tok).join(' | '))+'</td></tr>';});
    $('list').innerHTML=h;var pages=Math.max(1,Math.ceil(rows.length/n));
    $('pager').innerHTML=rows.length+' latents · page '+(page+1)+' of '+pages+' <button id="prev">prev</button><button id="next">next</button>';
    $('prev').onclick=function(){if(page>0){page--;draw();}};$('next').onclick=function(){if(page<pages-1){page++;draw();}};}
  $('q').oninput=update;$('sort').onchange=update;update();done();}

function ctx(w,max){var h='<div class="ctx"><span class="val">'+fmt(w.value)+'</span>';
  w.ids.forEach(function(id,j){var k=w.kept?w.kept[j]:1,a=max>0?Math.max(0,w.acts[j])/max:0,cls='tok'+(j===w.at?' at':'')+(k?'':' masked');
    var t=k?'activation '+fmt(w.acts[j]):'masked position (BOS/separator/padding): not encoded';
    h+='<span class="'+cls+'" title="'+esc(t)+'" style="background:rgba(255,120,0,'+a.toFixed(3)+')">'+esc(tok(id))+'</span>';});
  return h+'</div>';}
function hist(r){var E=state.members.hist_edges,c=r.hist.counts;if(!c.length)return '<p>never fired</p>';
  var w=Math.max(4,Math.floor(420/c.length)),H=110,mx=Math.max.apply(null,c),s='<svg width="'+(w*c.length+10)+'" height="'+(H+34)+'" role="img">';
  c.forEach(function(v,j){var h=Math.round(H*v/mx),b=r.hist.first+j,lo=b===0?'-inf':E[b-1],hi=b>=E.length?'inf':E[b];
    s+='<rect x="'+(j*w)+'" y="'+(H-h)+'" width="'+(w-1)+'" height="'+h+'" fill="#5b8db8"><title>log10 activation ['+lo+', '+hi+'): '+v+'</title></rect>';});
  var b0=r.hist.first,b1=r.hist.first+c.length;
  s+='<text x="0" y="'+(H+16)+'" font-size="11">'+(b0===0?'<0.001':fmt(Math.pow(10,E[b0-1])))+'</text><text x="'+(w*c.length)+
    '" y="'+(H+16)+'" font-size="11" text-anchor="end">'+(b1>E.length?'>1000':fmt(Math.pow(10,E[b1-1])))+'</text>'+
    '<text x="'+(w*c.length/2)+'" y="'+(H+28)+'" font-size="11" text-anchor="middle">activation (log scale)</text></svg>';
  return s;}
function logitTable(r,key,title){if(!r.logits)return '';var h='<table><tr><th class="l">'+title+'</th><th>W_dec·W_U</th></tr>';
  r.logits[key].forEach(function(p){h+='<tr><td class="l">'+esc(tok(p[0]))+'</td><td>'+fmt(p[1])+'</td></tr>';});return h+'</table>';}
function renderLatent(){var x=member();if(!x)return;var l=+x.p.l,d=x.d;
  if(!(l>=0&&l<d.n_shown)){fail('latent '+x.p.l+' is not among the '+d.n_shown+' latents shown for this member');return;}
  var key=x.m+'/'+Math.floor(l/d.block_size);
  if(!state.blocks[key]){load('data/m'+x.m+'/b'+Math.floor(l/d.block_size)+'.js');return;}
  var r=state.blocks[key][l%d.block_size];
  var h='<h1><a href="member.html#m='+x.m+'">'+esc(d.label)+'</a> · latent '+l+'</h1><p>'+
    (l>0?'<a href="#m='+x.m+'&l='+(l-1)+'">← '+(l-1)+'</a> ':'')+(l+1<d.n_shown?'<a href="#m='+x.m+'&l='+(l+1)+'">'+(l+1)+' →</a>':'')+
    '</p><p>density '+fmt(r.density)+' ('+r.fired+' of '+d.n_tokens+' tokens) · max activation '+fmt(r.max)+'</p>';
  d.notes.forEach(function(n){h+='<p class="note">'+esc(n)+'</p>';});
  h+='<div class="cols"><div><h2>Activation histogram</h2>'+hist(r)+'</div>';
  if(r.logits)h+='<div><h2>Logit effects</h2><div class="cols">'+logitTable(r,'pos','promoted')+logitTable(r,'neg','suppressed')+'</div></div>';
  h+='</div><h2>Top activations</h2><div id="top">';
  if(!r.top.length)h+='<p>This latent never fired on the evaluated tokens.</p>';
  r.top.forEach(function(w){h+=ctx(w,r.max);});h+='</div>';
  if(r.quantiles.length){h+='<h2>Samples by activation quantile</h2>';
    r.quantiles.slice().reverse().forEach(function(q){h+='<h3>activation '+fmt(q.low)+' – '+fmt(q.high)+'</h3>';
      q.windows.forEach(function(w){h+=ctx(w,r.max);});});}
  $('main').innerHTML=h;done();}

function render(){if(state.pending>0)return;var pg=document.body.getAttribute('data-page');
  try{if(pg==='index')renderIndex();else if(pg==='member')renderList();else renderLatent();}
  catch(e){fail('page error: '+e.message);throw e;}}
function start(){state.members=SB.membersData;if(!state.members){fail('data/members.js did not load');return;}
  var pg=document.body.getAttribute('data-page'),p=params();load('data/vocab.js');
  if(pg==='member'&&state.members.members[+p.m])load('data/m'+(+p.m)+'/list.js');}
window.addEventListener('hashchange',function(){document.body.setAttribute('data-state','loading');
  if(document.body.getAttribute('data-page')==='member'){var p=params();if(!state.lists[+p.m]&&state.members.members[+p.m]){load('data/m'+(+p.m)+'/list.js');return;}}
  render();});
start();
})();
"""
